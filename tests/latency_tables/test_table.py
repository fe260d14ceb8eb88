import json

import numpy as np
import pytest

from latprune.errors import BadInput
from latprune.latency_tables.table import Fingerprint, LatencyTable
from latprune.models.widths import candidate_widths
from latprune.testing import fake_table, residual_net


@pytest.fixture()
def table():
    return fake_table(residual_net(), step=8)


def test_round_trip(tmp_path, table):
    table.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back.fingerprint == table.fingerprint
    assert back.layer_keys == table.layer_keys
    for k, t in table.layers.items():
        np.testing.assert_allclose(back.layers[k].median_ms, t.median_ms)
        assert back.layers[k].signature == t.signature
    assert back.dense_ms == pytest.approx(table.dense_ms)
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temp file left behind


def test_identical_layers_share_one_signature(table):
    assert table.layer_keys["a1.0"] == table.layer_keys["a2.0"]
    assert len(table.layers) < len(table.layer_keys)


def test_lookup_exact_on_grid_and_linear_between(table):
    name = "b2.0"  # 32 -> 32 conv: grid 8..32
    t = table.layers[table.layer_keys[name]]
    assert table.lookup(name, 16, 24) == pytest.approx(t.median_ms[1, 2])
    mid = table.lookup(name, 16, 20)
    assert mid == pytest.approx((t.median_ms[1, 1] + t.median_ms[1, 2]) / 2)


def test_grid():
    assert candidate_widths(64, 16).tolist() == [16, 32, 48, 64]
    assert candidate_widths(20, 8).tolist() == [8, 16, 20]
    assert candidate_widths(3, 8).tolist() == [3]


def test_mismatched_setting_is_refused_with_the_difference(table):
    other = Fingerprint(**{**table.fingerprint.__dict__, "batch": 32, "runtime": "ort"})
    with pytest.raises(BadInput, match=r"batch: table has 1, run wants 32.*--force"):
        table.check_compatible(other)
    table.check_compatible(other, force=True)  # --force overrides


def test_truncated_table_is_refused(tmp_path, table):
    p = table.save(tmp_path / "t.json")
    p.write_text(p.read_text()[: len(p.read_text()) // 2])
    with pytest.raises(BadInput, match="truncated or corrupted"):
        LatencyTable.load(p)


def test_corrupted_entry_is_refused(tmp_path, table):
    d = table.to_dict()
    k = next(iter(d["layers"]))
    d["layers"][k]["median_ms"][0][0] = -1.0
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(BadInput, match="positive"):
        LatencyTable.load(tmp_path / "t.json")


def test_wrong_schema_is_refused(tmp_path, table):
    d = table.to_dict()
    d["schema_version"] = 99
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(BadInput, match="schema"):
        LatencyTable.load(tmp_path / "t.json")


def test_a_table_from_an_older_schema_names_the_rebuild_command(tmp_path, table):
    d = table.to_dict()
    d["schema_version"] = 1
    del d["e2e"]
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(BadInput, match=r"schema 1, this latprune reads schema 2: rebuild it with `latprune profile"):
        LatencyTable.load(tmp_path / "t.json")


def test_a_runtime_upgrade_is_a_different_setting(table):
    other = Fingerprint(**{**table.fingerprint.__dict__, "runtime_version": "1.99"})
    with pytest.raises(BadInput, match=r"runtime_version: table has '0', run wants '1.99'"):
        table.check_compatible(other)
    newer = Fingerprint(**{**table.fingerprint.__dict__, "latprune_version": "9.9"})
    table.check_compatible(newer)  # recorded, not matched


def test_end_to_end_term_survives_the_round_trip(tmp_path, table):
    back = LatencyTable.load(table.save(tmp_path / "t.json"))
    assert back.e2e.intercept_ms == table.e2e.intercept_ms and back.e2e.slope == table.e2e.slope
    assert back.e2e.points == table.e2e.points
