"""A runtime wired to the Pod's health directory: ``--exit-with`` and the Pod's probes.

The runtime layer knows no feature; this is where the runtime options that concern the
shared health directory (``--health-dir``, ``--exit-with``, ``--exit-with-code``,
``--exit-with-quit``) take effect. Every command builds its runtime here, and so can a
program that embeds a component and wants the same behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from podpatterns.health.aggregate import Aggregate
from podpatterns.health.exitwith import ExitWith
from podpatterns.runtime import Component, Runtime, RuntimeConfig, Trigger


def pod_runtime(
    config: RuntimeConfig,
    components: Sequence[Component],
    *,
    triggers: Sequence[Trigger] = (),
    expected: Iterable[str] = (),
    pod_probes: bool = False,
) -> Runtime:
    """A :class:`~podpatterns.runtime.Runtime` with what ``config``'s health settings ask.

    Args:
        config: the runtime settings.
        components: what the runtime runs.
        triggers: more shutdown triggers.
        expected: containers the Pod's ``readyz`` and ``startupz`` wait for even before
            their first record (``podpatterns health --expect``).
        pod_probes: the plain probes answer for the whole Pod (``podpatterns health``).

    With ``health_dir``, the admin server answers the Pod's probes
    (:mod:`podpatterns.health.aggregate`); with ``exit_with``, the runtime shuts down on
    that container's tombstone and the process exits with ``exit_with_code``.
    """
    all_triggers: list[Trigger] = list(triggers)
    collectors = []
    if config.exit_with is not None and config.health_dir is not None:
        exit_with = ExitWith(
            config.health_dir,
            config.exit_with,
            quit_urls=config.exit_with_quit,
            exit_code=config.exit_with_code,
        )
        all_triggers.append(exit_with)
        collectors.extend(exit_with.collectors())
    pod = None
    if config.health_dir is not None:
        pod = Aggregate(config.health_dir, expected=expected)
    return Runtime(
        config,
        components,
        triggers=all_triggers,
        collectors=collectors,
        pod=pod,
        pod_probes=pod_probes,
    )
