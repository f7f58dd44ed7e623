"""The deployment files agree with each other and with the app: compose, nginx, Dockerfile.

No container engine runs here, so the images are not built; what can be checked without one
is: every setting the compose file sets exists, the proxy the app trusts is the nginx of the
compose file, the sub-path is the same on both sides, the Dockerfile's stages and arguments
are those the README and compose use. (The nginx site itself runs in ``test_nginx.py``.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_compose_file_sets_only_real_settings(compose: dict[str, Any]) -> None:
    env = compose["services"]["app"]["environment"]
    for name in env:
        assert name.startswith(ENV_PREFIX), name
        assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, name
    settings = Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()})
    assert settings.root_path == "/textgen"


def test_the_app_trusts_exactly_the_compose_nginx(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nginx_address = services["nginx"]["networks"]["backend"]["ipv4_address"]
    assert services["app"]["environment"]["WORDRNN_FORWARDED_ALLOW_IPS"] == nginx_address
    assert "ports" not in services["app"], "the app is reachable only through nginx"
    assert services["nginx"]["depends_on"]["app"]["condition"] == "service_healthy"


def test_nginx_serves_the_sub_path_the_app_is_given(compose: dict[str, Any]) -> None:
    site = (DEPLOY / "nginx.conf").read_text()
    root_path = compose["services"]["app"]["environment"]["WORDRNN_ROOT_PATH"]
    assert f"location {root_path}/ {{" in site
    assert "proxy_pass http://wordrnn/;" in site  # the trailing slash strips the prefix
    mount = compose["services"]["nginx"]["volumes"][0]
    source, target, _ = mount.split(":")
    assert (DEPLOY / source).resolve() == DEPLOY / "nginx.conf"
    assert target == "/etc/nginx/conf.d/default.conf"
    port = re.search(r"server app:(\d+);", site)
    assert port is not None
    assert f"WORDRNN_PORT={port.group(1)}" in dockerfile()


def test_the_compose_build_arguments_and_volume_match_the_dockerfile(
    compose: dict[str, Any],
) -> None:
    app = compose["services"]["app"]
    declared = set(re.findall(r"^ARG (\w+)", dockerfile(), re.M))
    assert set(app["build"]["args"]) <= declared
    model_dir = app["environment"]["WORDRNN_MODEL_DIR"]
    assert any(v.split(":")[1] == model_dir for v in app["volumes"])
    assert f"WORDRNN_MODEL_DIR={model_dir}" in dockerfile()


def test_the_dockerfile_has_a_volume_image_and_a_baked_image() -> None:
    text = dockerfile()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["build", "base", "baked", "runtime"]  # runtime last: the default target
    runtime = text.split("AS runtime", 1)[1]
    assert 'VOLUME ["/models"]' in runtime
    baked = text.split("AS baked", 1)[1].split("FROM ", 1)[0]
    assert "ARG MODEL_DIR" in baked
    assert "COPY ${MODEL_DIR} /models/default" in baked
    assert "VOLUME" not in text.split("AS runtime", 1)[0]  # a baked model is not hidden
    for needed in ("TORCH_SPEC", "TORCH_INDEX_URL", "WORDRNN_FORWARDED_ALLOW_IPS", "SIGTERM"):
        assert needed in text, needed
