"""``shardon nodes``: the fleet from the command line, through the admin API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shardon.cli import main
from tests.fleet.fleet_helpers import ADMIN, NODE_SECRET, chat
from tests.support import node_entry


def shardon(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("engine", ["native"])  # the command line's test: one engine is enough
def test_nodes_command(make_mock: Any, make_gateway: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = make_mock(models=["m1"], name="n")
    extra = make_mock(models=["real"], name="extra")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], auth={"admin_keys": [ADMIN]})
    admin = ("--url", gw.url, "--admin-key", ADMIN)

    code, out, _ = shardon(capsys, "nodes", *admin)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "SOURCE", "STATE", "IN_FLIGHT", "WEIGHT", "LOAD", "MODELS", "URL"]
    assert row.split()[:5] == ["n", "config", "closed", "0/4", "1.0"]

    code, out, _ = shardon(
        capsys, "nodes", "add", "extra", extra.url, "--models", "public=real", "--max-concurrent", "3",
        "--node-key", NODE_SECRET, *admin,
    )  # fmt: skip
    assert code == 0 and out.splitlines()[1].split()[:4] == ["extra", "admin", "closed", "0/3"]
    assert NODE_SECRET not in out
    assert chat(gw.url, "public")[1]["x-shardon-node"] == "extra"
    assert json.loads(extra.stats.last_body)["model"] == "real"

    code, out, _ = shardon(capsys, "nodes", "drain", "n", *admin)
    assert code == 0 and "closed, draining" in out
    code, out, _ = shardon(capsys, "nodes", "undrain", "n", *admin)
    assert code == 0 and "draining" not in out
    code, out, _ = shardon(capsys, "nodes", "list", "--json", *admin)
    assert {n["id"]: n["source"] for n in json.loads(out)} == {"n": "config", "extra": "admin"}
    code, out, _ = shardon(capsys, "nodes", "remove", "extra", *admin)
    assert code == 0 and out.strip() == "removed extra"

    code, _, err = shardon(capsys, "nodes", "remove", "n", *admin)
    assert code == 1 and "drained" in err  # a config node
    code, _, err = shardon(capsys, "nodes", "drain", *admin)
    assert code == 2 and "needs the node's id" in err
    code, _, err = shardon(capsys, "nodes", "add", "x", *admin)
    assert code == 2 and "--models" in err
    code, _, err = shardon(capsys, "nodes", "--url", gw.url, "--admin-key", "sk-wrong")
    assert code == 1 and "401" in err
