"""Session fixtures of the end-to-end tests: the engine, the base and the built images.

Every test here is slow (a debootstrap and three image builds on a fresh machine, about
two minutes) and needs root for rootful podman.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.engine import (
    TARGETS,
    Engine,
    build,
    build_app,
    debug_image,
    engine,
    ensure_base,
    prune,
)

# The first test that asks for the images builds them (apt in the builder stage, pip, the
# slimming, three targets): minutes on a fresh, loaded machine, which the default
# per-test timeout would cut.
E2E_TIMEOUT = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder slow and root, with the e2e timeout."""
    for item in items:
        if item.path.is_relative_to(__file__.rsplit("/", 1)[0]):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.root)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(E2E_TIMEOUT))


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """podman with the project's containers.conf."""
    return engine(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def base(podman: Engine) -> str:
    """The local Debian 12 base image with python3."""
    return ensure_base(podman)


@pytest.fixture(scope="session")
def images(podman: Engine, base: str) -> Iterator[dict[str, str]]:
    """The three podpatterns images, built from this checkout: target -> local name."""
    yield {target: build(podman, target, base) for target in TARGETS}
    prune(podman)


@pytest.fixture(scope="session")
def debug_images(podman: Engine, base: str, images: dict[str, str]) -> dict[str, str]:
    """The -debug variants (the images plus busybox): target -> local name."""
    return {t: build(podman, f"{t}-debug", base, debug_image(t)) for t in TARGETS}


@pytest.fixture(scope="session")
def app_image(podman: Engine, base: str) -> str:
    """The stand-in application image (nginx, psql)."""
    return build_app(podman, base)
