"""Configuration from CLI flags and VLSERVE_* variables."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from engine.config import EngineConfig
from server.cli import build_parser, config_from_args, main
from server.config import ServerConfig
from server.hypercorn_config import LISTEN_BACKLOG, bind_address, hypercorn_config
from server.options import ConfigError, config_from_env, config_options
from vl.media_policy import MediaPolicy
from vl.prep_config import PrepConfig


def parse(argv, environ=None):
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, environ or {})


def leaf_fields(cls, prefix=()):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from leaf_fields(hints[field.name], (*prefix, field.name))
        else:
            yield (*prefix, field.name)


# every flag (and VLSERVE_* variable) users had before the configs were nested
FLAGS = [
    "--model", "--served-model-name", "--host", "--port", "--api-key", "--cors-allow-origins",
    "--max-body-bytes", "--max-concurrent-requests", "--dtype", "--device", "--max-num-seqs",
    "--max-num-batched-tokens", "--max-model-len", "--engine-process", "--engine-torch-threads",
    "--engine-nice", "--decode-steps-per-call", "--stream-interval", "--image-prep-concurrency",
    "--tokenizer-concurrency", "--prep-processes", "--prep-nice", "--vision-max-batch-size",
    "--vision-max-batch-patches", "--mm-cache-mb", "--pixel-slots", "--pixel-slot-mb",
    "--allowed-local-media-path",
    "--allowed-media-domains", "--allow-private-media-urls", "--max-images-per-request",
    "--max-image-bytes", "--max-image-pixels", "--image-fetch-timeout", "--image-fetch-concurrency",
    "--max-image-redirects", "--switch-interval", "--drain-timeout",
]  # fmt: skip


def test_every_config_field_has_a_flag_and_variable():
    """Each leaf field of the nested configs is one option, and no existing flag or
    variable name changed."""
    options = config_options()
    assert {o.path for o in options} == set(leaf_fields(ServerConfig))
    flags = {o.flag for o in options}
    assert set(FLAGS) <= flags
    envs = {o.env for o in options}
    assert {"VLSERVE_" + f[2:].replace("-", "_").upper() for f in FLAGS} <= envs


def test_every_flag_says_what_it_means_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in config_options():
        assert option.help_text != option.name.replace("_", " "), option.name
    assert (
        "sequences decoded together in one batch; more requests wait for a row (vLLM's default) (default: 256)" in text
    )
    assert "[env VLSERVE_ENGINE_NICE]" in text


def test_nested_fields_come_from_their_flags():
    config = parse(["--max-num-seqs", "3", "--no-engine-process", "--engine-nice", "2", "--prep-processes",
                    "--max-image-redirects", "1"])  # fmt: skip
    assert config.engine == EngineConfig(max_num_seqs=3, in_worker_process=False, nice=2)
    assert config.prep == PrepConfig(processes=True)
    assert config.media == MediaPolicy(max_redirects=1)


def test_a_value_a_config_rejects_is_a_config_error():
    with pytest.raises(ConfigError, match="max_redirects"):
        config_from_env({"VLSERVE_MAX_IMAGE_REDIRECTS": "-1"})


def test_defaults():
    assert parse([]) == ServerConfig()


def test_flags():
    config = parse(
        [
            "--model",
            "/m",
            "--port",
            "9000",
            "--api-key",
            "a",
            "--api-key",
            "b,c",
            "--max-body-bytes",
            "1000",
            "--allow-private-media-urls",
            "--image-fetch-timeout",
            "2.5",
        ]
    )
    assert config.model == "/m" and config.port == 9000
    assert config.api_keys == ("a", "b", "c")
    assert config.max_body_bytes == 1000 and config.media.allow_private_media_urls is True
    assert config.media.fetch_timeout == 2.5


def test_environment_and_precedence():
    environ = {
        "VLSERVE_PORT": "7000",
        "VLSERVE_API_KEY": "k1,k2",
        "VLSERVE_DEVICE": "cuda",
        "VLSERVE_ALLOW_PRIVATE_MEDIA_URLS": "yes",
        "VLSERVE_MODEL": "",
    }
    config = parse(["--port", "7001"], environ)
    assert config.port == 7001  # the flag wins
    assert config.api_keys == ("k1", "k2") and config.engine.device == "cuda"
    assert config.media.allow_private_media_urls is True and config.model is None
    assert config_from_env(environ).port == 7000


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"VLSERVE_PORT": "x"}, "VLSERVE_PORT"),
        ({"VLSERVE_ALLOW_PRIVATE_MEDIA_URLS": "maybe"}, "VLSERVE_ALLOW"),
    ],
)
def test_bad_environment_value_names_the_variable(environ, name):
    with pytest.raises(ConfigError, match=name):
        config_from_env(environ)


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(ConfigError, match="--port"):
        parse(["--port", "x"])
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "x"])
    assert exited.value.code == 2
    assert "--port: expected int" in capsys.readouterr().err


def test_hypercorn_config():
    config = ServerConfig(host="::1", port=0, drain_timeout=7)
    hyper = hypercorn_config(config, {"keep_alive_timeout": 1})
    assert hyper.bind == ["[::1]:0"] and hyper.graceful_timeout == 7
    assert hyper.keep_alive_timeout == 1
    assert hyper.backlog == LISTEN_BACKLOG >= 1024  # bursts of hundreds of connects (hypercorn's default: 100)
    assert hypercorn_config(config, {"backlog": 64}).backlog == 64
    assert bind_address("0.0.0.0", 80) == "0.0.0.0:80"
    with pytest.raises(ConfigError):
        hypercorn_config(config, {"no_such_setting": 1})


def test_make_tiny_model_command(tmp_path, capsys):
    target = tmp_path / "tiny"
    assert main(["make-tiny-model", str(target)]) == 0
    assert (target / "config.json").exists()
    assert capsys.readouterr().out.strip() == str(target)
