"""Kubernetes metadata on every record: Downward API variables and a downwardAPI volume
(re-read when the kubelet swaps its ..data symlink)."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from podpatterns.adapter import Adapter
from podpatterns.adapter.config import build
from podpatterns.adapter.k8s import env_fields, parse_downward_file
from podpatterns.errors import ConfigError
from tests.adapter_harness import ListSink, SeqWriter, config
from tests.kubelet import configmap_write
from tests.waiting import eventually


def test_the_kubelets_label_format_is_read() -> None:
    """key="value" lines with Go quoting; a line that is not one is skipped."""
    text = (
        'app="web"\n'
        'app.kubernetes.io/version="1.2"\n'
        'note="a \\"quoted\\" word\\nand a line"\n'
        "garbage line\n"
        'empty=""\n'
        'uni="caf\u00e9 \\u00e9"\n'
    )
    assert parse_downward_file(text) == {
        "app": "web",
        "app.kubernetes.io/version": "1.2",
        "note": 'a "quoted" word\nand a line',
        "empty": "",
        "uni": "caf\u00e9 \u00e9",
    }


def test_default_expands_to_the_usual_variables() -> None:
    """default stands for four fields; a later pair overrides one of them."""
    cfg = build({"path": ["/x/*.log"], "k8s_env_metadata": ["default", "k8s_node=MY_NODE"]}, {}, {})
    assert dict(env_fields(cfg.k8s_env_metadata)) == {
        "k8s_pod": "POD_NAME",
        "k8s_namespace": "POD_NAMESPACE",
        "k8s_node": "MY_NODE",
        "k8s_container": "CONTAINER_NAME",
    }
    with pytest.raises(ConfigError, match="--k8s-env-metadata: 'pod=1X' has '1X', which is not"):
        build({"path": ["/x/*.log"], "k8s_env_metadata": ["pod=1X"]}, {}, {})


async def test_records_carry_env_and_volume_metadata_and_follow_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pod, namespace and node from the environment, labels and annotations from the
    volume; after the kubelet's ..data swap, new records carry the new labels."""
    monkeypatch.setenv("POD_NAME", "web-0")
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    monkeypatch.setenv("NODE_NAME", "node-a")
    monkeypatch.delenv("CONTAINER_NAME", raising=False)
    meta = tmp_path / "podinfo"
    meta.mkdir()
    configmap_write(meta, 1, {"labels": 'app="web"\ntier="front"\n', "annotations": 'a="1"\n'})
    (tmp_path / "logs").mkdir()
    w = SeqWriter(tmp_path / "logs" / "app.log")
    sink = ListSink()
    cfg = config(
        tmp_path,
        "logs/*.log",
        k8s_env_metadata=(("default", "*"),),
        k8s_metadata_dir=meta,
    )
    with structlog.testing.capture_logs() as logs:
        adapter = Adapter(cfg, sink=sink)
        await adapter.start()
        try:
            w.write(10)
            await eventually(lambda: len(sink.records) >= 10)
            configmap_write(meta, 2, {"labels": 'app="web"\ntier="back"\n', "annotations": ""})
            await eventually(lambda: adapter._k8s.fields["k8s_labels"]["tier"] == "back")
            w.write(10)
            await eventually(lambda: len(sink.records) >= 20)
        finally:
            adapter.stop_accepting()
            await adapter.wait_drained()
            await adapter.close()
    first, last = sink.records[0], sink.records[-1]
    assert first["k8s_pod"] == "web-0"
    assert first["k8s_namespace"] == "shop"
    assert first["k8s_node"] == "node-a"
    assert "k8s_container" not in first  # not set: nothing added
    assert first["k8s_labels"] == {"app": "web", "tier": "front"}
    assert first["k8s_annotations"] == {"a": "1"}
    assert last["k8s_labels"] == {"app": "web", "tier": "back"}
    assert last["k8s_annotations"] == {}
    assert last["k8s_pod"] == "web-0"
    assert [e["variables"] for e in logs if e["event"] == "k8s_env_missing"] == [["CONTAINER_NAME"]]
    assert any(e["event"] == "k8s_metadata_changed" for e in logs)
