"""Configuration from CLI flags and VLSERVE_* variables."""

from __future__ import annotations

import dataclasses

import pytest

from server.cli import build_parser, config_from_args, main
from server.config import ServerConfig
from server.hypercorn_config import LISTEN_BACKLOG, bind_address, hypercorn_config
from server.options import ConfigError, config_from_env, config_options


def parse(argv, environ=None):
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, environ or {})


def test_every_config_field_has_a_flag_and_variable():
    names = {o.field for o in config_options()}
    assert names == {f.name for f in dataclasses.fields(ServerConfig)} - {"extra"}
    flags = {o.flag for o in config_options()}
    for flag in [
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--api-key",
        "--cors-allow-origins",
        "--max-body-bytes",
        "--max-concurrent-requests",
        "--dtype",
        "--device",
        "--max-num-seqs",
        "--max-model-len",
    ]:
        assert flag in flags


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
    assert config.max_body_bytes == 1000 and config.allow_private_media_urls is True
    assert config.image_fetch_timeout == 2.5


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
    assert config.api_keys == ("k1", "k2") and config.device == "cuda"
    assert config.allow_private_media_urls is True and config.model is None
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
