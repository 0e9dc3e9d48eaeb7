"""What the fleet reads: multipart forms, the load in /metrics and /slots, nodes in the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardon.config import load_config
from shardon.endpoints import ENDPOINTS, LARGE_BODIES, body_limits
from shardon.errors import BadRequest, ConfigError
from shardon.multipart import FormError, boundary_of, form_data, form_fields, replace_field
from shardon.nodeload import parse_metrics, parse_slots
from shardon.schemas import answer_usage, form_routing

FORM = (
    b"--b0undary\r\n"
    b'Content-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
    b"Content-Type: audio/wav\r\n\r\n"
    b"RIFF\r\n--b0undar not the end\r\n"
    b"--b0undary\r\n"
    b'Content-Disposition: form-data; name="model"\r\n\r\n'
    b"whisper-1\r\n"
    b"--b0undary\r\n"
    b'Content-Disposition: form-data; name="stream"\r\n\r\n'
    b"true\r\n"
    b"--b0undary--\r\n"
)


def test_boundary_of_a_content_type() -> None:
    assert boundary_of("multipart/form-data; boundary=b0undary") == b"b0undary"
    assert boundary_of('Multipart/Form-Data; charset=utf-8; boundary="a b"') == b"a b"
    for bad in (None, "", "application/json", "multipart/form-data", "multipart/form-data; boundary="):
        with pytest.raises(FormError):
            boundary_of(bad)


def test_form_fields_and_replacing_one() -> None:
    assert form_fields(FORM, b"b0undary", frozenset({"model", "stream"})) == {"model": "whisper-1", "stream": "true"}
    assert form_fields(FORM, b"b0undary", frozenset({"file"})) == {}  # a file is not a text field
    parts = form_data(FORM, b"b0undary")
    assert parts[0] == ("file", True, b"RIFF\r\n--b0undar not the end")
    renamed = replace_field(FORM, b"b0undary", "model", "whisper-large")
    assert form_fields(renamed, b"b0undary", frozenset({"model"})) == {"model": "whisper-large"}
    assert renamed.replace(b"whisper-large", b"whisper-1") == FORM  # every other byte kept
    with pytest.raises(FormError):
        replace_field(FORM, b"b0undary", "missing", "x")
    for bad in (b"no boundary here", b"--b0undary\r\nContent-Disposition: form-data", b"--b0undaryXX"):
        with pytest.raises(FormError):
            form_data(bad, b"b0undary")


def test_form_routing_fields() -> None:
    req = form_routing(FORM, "multipart/form-data; boundary=b0undary")
    assert (req.model, req.stream, req.boundary) == ("whisper-1", True, b"b0undary")
    without = FORM.replace(b'name="model"', b'name="prompt"').replace(b'name="stream"', b'name="other"')
    with pytest.raises(BadRequest) as missing:
        form_routing(without, "multipart/form-data; boundary=b0undary")
    assert missing.value.param == "model"
    with pytest.raises(BadRequest, match="stream must be true or false"):
        form_routing(FORM.replace(b"true", b"perhaps"), "multipart/form-data; boundary=b0undary")
    with pytest.raises(BadRequest, match="multipart/form-data"):
        form_routing(FORM, "application/json")


def test_answer_usage_of_any_endpoint() -> None:
    assert answer_usage(b'{"usage":{"input_tokens":3,"output_tokens":5}}') == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
    }
    assert answer_usage(b'{"usage":{"prompt_tokens":2,"total_tokens":2}}') == {
        "prompt_tokens": 2,
        "completion_tokens": None,
    }
    assert answer_usage(b'{"results":[],"usage":{"total_tokens":9}}') == {"prompt_tokens": 9, "completion_tokens": None}
    for none in (b"ID3\x00audio", b'{"text":"hi"}', b"{not json", b'{"usage":"x"}', b""):
        assert answer_usage(none) is None


def test_vllm_metrics_summed_over_models() -> None:
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="a"} 3.0\n'
        'vllm:num_requests_running{engine="0",model_name="b"} 2.0\n'
        'vllm:num_requests_waiting{model_name="a"} 7.0\n'
        'vllm:gpu_cache_usage_perc{model_name="a"} 0.5\n'  # before vLLM V1
        'vllm:gpu_cache_usage_perc{model_name="b"} 0.75\n'
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0\n'
        "vllm:num_requests_running{broken 1\n"
    )
    load = parse_metrics(text, 5.0)
    assert load is not None
    assert (load.source, load.running, load.waiting, load.kv_cache_usage, load.requests) == (
        "vllm /metrics",
        5.0,
        7.0,
        0.75,
        12.0,
    )
    assert load.public(7.5)["age_s"] == 2.5


def test_llama_cpp_metrics_and_slots() -> None:
    load = parse_metrics(
        "llamacpp:requests_processing 2\nllamacpp:requests_deferred 4\nllamacpp:n_busy_slots_per_decode 1\n", 0
    )
    assert load is not None and (load.source, load.running, load.waiting, load.kv_cache_usage) == (
        "llama.cpp /metrics",
        2.0,
        4.0,
        None,
    )
    assert parse_metrics("process_cpu_seconds_total 3.0\n# nothing of ours\n", 0) is None
    assert parse_metrics("llamacpp:requests_processing nan\n", 0) is None  # a NaN says nothing
    slots = b'[{"id":0,"is_processing":true},{"id":1,"is_processing":false},{"id":2,"state":1}]'
    load = parse_slots(slots, 0)
    assert load is not None and (load.running, load.slots, load.waiting) == (2.0, 3, 0.0)
    for bad in (b'{"error":"no"}', b"[1,2]", b"not json"):
        assert parse_slots(bad, 0) is None


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    return str(err.value)


def test_node_config_is_checked(tmp_path: Path, certificates: dict[str, Path]) -> None:
    ca = certificates["ca"]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    ok = tmp_path / "ok.yaml"
    ok.write_text(
        f"nodes: [{{id: a, url: 'https://api.example.com', models: [m], ca_file: '{ca}', labels: {{zone: eu}}}}]"
    )
    node = load_config(ok, environ={}).nodes[0]
    assert node.ca_file == str(ca) and node.labels == {"zone": "eu"} and node.health_path is None
    assert config_error(tmp_path, "nodes: [{id: a, url: 'https://h', models: [m], ca_file: /no.pem}]").startswith(
        "nodes[0].ca_file"
    )
    assert config_error(tmp_path, f"nodes: [{{id: a, url: 'http://h:1', models: [m], ca_file: '{ca}'}}]").startswith(
        "nodes[0].ca_file"
    )
    assert config_error(tmp_path, f"nodes: [{{id: a, url: 'https://h', models: [m], ca_file: '{junk}'}}]").startswith(
        "nodes[0].ca_file: not a PEM certificate file"
    )
    assert config_error(tmp_path, "nodes: [{id: a, url: 'http://h:1/v1', models: [m]}]").startswith("nodes[0].url")
    assert config_error(tmp_path, "nodes: [{id: 'a/b', url: 'http://h:1', models: [m]}]").startswith("nodes[0].id")
    assert config_error(tmp_path, "nodes: [{id: a, url: 'http://h:1', models: [m], health_path: health}]").startswith(
        "nodes[0].health_path"
    )


def test_body_limits(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {max_body_bytes: 2048, endpoint_max_body_bytes: {/v1/rerank: 4096}}")
    limits = body_limits(load_config(path, environ={}).server)
    assert set(limits) == set(ENDPOINTS)
    assert limits["/v1/chat/completions"] == 2048 and limits["/v1/rerank"] == 4096
    assert limits["/v1/audio/transcriptions"] == LARGE_BODIES["/v1/audio/transcriptions"]
    assert config_error(tmp_path, "server: {endpoint_max_body_bytes: {/v1/nope: 1}}").startswith(
        "server.endpoint_max_body_bytes"
    )
