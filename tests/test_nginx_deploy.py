"""The deployment files agree with each other and with the app: compose, nginx, Dockerfile.

No container engine runs here, so the images are not built; what can be checked without one
is: every setting the compose file sets exists, the proxy the app trusts is the nginx of the
compose file, the sub-path is the same on both sides, the Dockerfile's stages and arguments
are those the README and compose use; the replicas' compose file and nginx site are those of
one app plus Redis and an upstream of every replica, and the site passes ``nginx -t``. (The
nginx sites themselves run in ``test_nginx.py`` and ``test_replicas.py``.)
"""

from __future__ import annotations

import re
import subprocess
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.settings import ENV_PREFIX, Settings
from tests.live_server import nginx_binary, nginx_main_config, replicas_site

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def settings_from(env: dict[str, str]) -> Settings:
    """The app's settings from a compose ``environment``, every name a real setting."""
    for name in env:
        assert name.startswith(ENV_PREFIX), name
        assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, name
    return Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()})


def test_the_compose_file_sets_only_real_settings(compose: dict[str, Any]) -> None:
    assert settings_from(compose["services"]["app"]["environment"]).root_path == "/textgen"


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


# -- several replicas: deploy/compose.replicas.yaml and deploy/nginx.replicas.conf -------------


@pytest.fixture(scope="module")
def replicas() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.replicas.yaml").read_text())  # type: ignore[no-any-return]


def test_the_replicas_are_the_single_app_with_sessions_in_redis(
    compose: dict[str, Any], replicas: dict[str, Any]
) -> None:
    single, app = compose["services"]["app"], replicas["services"]["app"]
    for key in ("build", "image", "volumes", "expose", "stop_grace_period", "restart"):
        assert app[key] == single[key], key
    own = {"WORDRNN_FORWARDED_ALLOW_IPS"}  # each stack trusts its own nginx
    shared = {k: v for k, v in single["environment"].items() if k not in own}
    assert shared.items() <= app["environment"].items()

    settings = settings_from(app["environment"])
    assert settings.session_store == "redis"
    redis_host = urlsplit(settings.redis_url).hostname
    assert redis_host in replicas["services"], settings.redis_url
    assert "healthcheck" in replicas["services"][redis_host]
    assert app["depends_on"][redis_host]["condition"] == "service_healthy"


def test_the_replicas_scale_behind_the_one_proxy_they_trust(
    compose: dict[str, Any], replicas: dict[str, Any]
) -> None:
    app, nginx = replicas["services"]["app"], replicas["services"]["nginx"]
    # No fixed address, published port or container name: `--scale app=N` can start N.
    assert app["networks"] == ["backend"]
    assert not {"ports", "container_name"} & set(app)
    nginx_address = ip_address(nginx["networks"]["backend"]["ipv4_address"])
    assert app["environment"]["WORDRNN_FORWARDED_ALLOW_IPS"] == str(nginx_address)
    assert nginx["depends_on"]["app"]["condition"] == "service_healthy"

    (pool,) = replicas["networks"]["backend"]["ipam"]["config"]
    assert nginx_address in ip_network(pool["subnet"])
    assert nginx_address not in ip_network(pool["ip_range"]), "a replica could take it"
    (single_pool,) = compose["networks"]["backend"]["ipam"]["config"]
    assert not ip_network(pool["subnet"]).overlaps(ip_network(single_pool["subnet"]))
    assert replicas["name"] != compose["name"]  # both stacks may run side by side


def block(start: str, site: str) -> str:
    """The top-level block of an nginx site that begins with ``start``, up to its closing brace."""
    found = re.search(rf"^{re.escape(start)}.*?^\}}$", site, re.M | re.S)
    assert found, f"no {start!r} block"
    return found.group(0)


def test_the_replicas_site_is_the_single_site_with_every_replica_upstream(
    replicas: dict[str, Any],
) -> None:
    single = (DEPLOY / "nginx.conf").read_text()
    site = (DEPLOY / "nginx.replicas.conf").read_text()
    for start in ("map ", "server {"):
        assert block(start, site) == block(start, single), f"the {start!r} blocks differ"

    upstream = block("upstream wordrnn {", site)
    # Every address Docker's DNS gives for the service, asked again while nginx runs.
    assert re.search(r"^ *server app:8000 resolve\b", upstream, re.M)
    assert re.search(r"^ *zone wordrnn \S+;", upstream, re.M)  # `resolve` needs it
    assert re.search(r"^resolver 127\.0\.0\.11\b", site, re.M)
    assert "WORDRNN_PORT=8000" in dockerfile()

    nginx = replicas["services"]["nginx"]
    source, target, _ = nginx["volumes"][0].split(":")
    assert (DEPLOY / source).resolve() == DEPLOY / "nginx.replicas.conf"
    assert target == "/etc/nginx/conf.d/default.conf"
    version = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?-alpine", nginx["image"])
    assert version, nginx["image"]
    assert tuple(int(part or 0) for part in version.groups()) >= (1, 27, 3)  # `resolve` in OSS


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
def test_the_replicas_site_passes_nginx_t(tmp_path: Path) -> None:
    for sub in ("logs", "tmp"):
        (tmp_path / sub).mkdir()
    site = tmp_path / "site.conf"
    site.write_text(replicas_site([8001, 8002, 8003], tmp_path / "access.log")(8080))
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_main_config(tmp_path, site))
    checked = subprocess.run(
        [str(nginx_binary()), "-t", "-c", str(config), "-p", f"{tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert site.read_text().count("server 127.0.0.1:800") == 3
