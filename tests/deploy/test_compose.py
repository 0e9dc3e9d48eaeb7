"""deploy/compose.yaml: the three services fit together.

Its images (nginx, llama.cpp's server) come from registries, so the stack is not started here; its
parts are run elsewhere in tests/deploy (the image, the nginx file, Shardon behind nginx). This test
checks what ties them: the files it mounts and builds from exist, Shardon accepts its config, nginx
(sharing Shardon's network namespace) reaches Shardon where the nginx file says and is trusted
for X-Forwarded-For, and the node URL names the llama service on its port.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from shardon.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_services_fit_together() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"llama", "shardon", "nginx"}
    shardon, nginx, llama = services["shardon"], services["nginx"], services["llama"]

    build = shardon["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Containerfile"
    mounts = {m.split(":")[1]: DEPLOY / m.split(":")[0] for m in shardon["volumes"] if m.startswith("./")}
    config_file = mounts["/etc/shardon/shardon.yaml"]
    admin_keys = shardon["environment"]["SHARDON_AUTH_ADMIN_KEYS"].replace(
        "${SHARDON_ADMIN_KEY:-sk-admin-change-me}", "sk-x"
    )
    config = load_config(config_file, environ={"SHARDON_AUTH_ADMIN_KEYS": admin_keys})
    assert config.auth.admin_keys == ["sk-x"]

    # nginx runs in Shardon's network namespace, with the nginx file unchanged.
    assert nginx["network_mode"] == "service:shardon"
    (site,) = (DEPLOY / m.split(":")[0] for m in nginx["volumes"])
    assert site == DEPLOY / "nginx" / "shardon.conf"
    upstream = re.search(r"upstream shardon \{\s*server ([\d.]+):(\d+);", site.read_text())
    assert upstream
    assert (config.server.host, config.server.port) == (upstream.group(1), int(upstream.group(2)))
    assert upstream.group(1) in config.server.trusted_proxies
    listen = re.search(r"^\s*listen (\d+);", site.read_text(), re.M)
    assert listen and shardon["ports"] == [f"8000:{listen.group(1)}"]
    # Stopping waits for the drain.
    assert int(shardon["stop_grace_period"].rstrip("s")) > config.server.drain_timeout_s

    (node,) = config.nodes
    url = urlsplit(node.url)
    assert url.hostname == "llama"
    command = llama["command"]
    assert command[command.index("--port") + 1] == str(url.port)
    assert command[command.index("--alias") + 1] in node.model_map()
    assert int(command[command.index("--parallel") + 1]) == node.max_concurrent
