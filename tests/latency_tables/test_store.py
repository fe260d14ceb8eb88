"""The per-device latency store (latency_tables.store) and `latprune tables`."""
import json
import logging
import multiprocessing
import sqlite3

import pytest

from latprune.cli import main
from latprune.latency_tables.profile import ProfileConfig, layer_signatures, profile_model
from latprune.latency_tables.store import STORE_SCHEMA, Entry, LatencyStore, device_key, shape_key
from latprune.latency_tables.table import Fingerprint, LayerSignature
from latprune.testing import FakeBackend, residual_net

FP = Fingerprint("cpu A [avx2]", "ort", "1.0", "CPU", 2, 32, "float32", (3, 32, 32))
SIG = LayerSignature("conv", 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), (8, 8))


def test_round_trip_and_keys(tmp_path):
    dev = device_key(FP)
    with LatencyStore(tmp_path / "s.sqlite") as s:
        s.put(dev, shape_key(SIG), 8, 16, Entry(0.5, 0.02, 90))
        s.put_period(dev, "conv", "out", 16)
    with LatencyStore(tmp_path / "s.sqlite") as s:  # persisted
        assert s.get_layer(dev, shape_key(SIG)) == {(8, 16): Entry(0.5, 0.02, 90)}
        assert s.get_period(dev, "conv", "out") == 16 and s.get_period(dev, "conv", "in") is None
    # the key leaves out what a layer entry does not depend on: the model's input, latprune's version,
    # and the layer's dense widths (a wider layer of the same shape shares the entries)
    import dataclasses
    assert device_key(dataclasses.replace(FP, input_shape=(3, 224, 224), latprune_version="9")) == dev
    assert shape_key(dataclasses.replace(SIG, c_in=128, c_out=256)) == shape_key(SIG)
    assert device_key(dataclasses.replace(FP, batch=1)) != dev
    assert device_key(dataclasses.replace(FP, runtime_version="1.1")) != dev


def test_profiles_share_entries_on_one_device_and_never_across_devices(tmp_path):
    store = LatencyStore(tmp_path / "s.sqlite")
    cfg = ProfileConfig(fit_configs=1)
    first = FakeBackend()
    t1 = profile_model(residual_net(), (3, 32, 32), first, cfg, progress=False, store=store)
    assert t1.meta["measured"] == len(first.layers_timed) - 1 > 0 and t1.meta["from_store"] == 0  # -1: warm-up
    again = FakeBackend()
    t2 = profile_model(residual_net(), (3, 32, 32), again, cfg, progress=False, store=store)
    assert again.layers_timed == [] and t2.meta["from_store"] == t1.meta["measured"]
    for k, lt in t1.layers.items():
        assert (t2.layers[k].median_ms == lt.median_ms).all()
    other = FakeBackend(batch=8)  # another batch is another device key: nothing is shared
    profile_model(residual_net(), (3, 32, 32), other, cfg, progress=False, store=store)
    assert len(other.layers_timed) == len(first.layers_timed)
    assert len(store.summary()) == 2


def test_a_second_model_measures_only_the_entries_the_store_lacks(tmp_path):
    store = LatencyStore(tmp_path / "s.sqlite")
    cfg = ProfileConfig(fit_configs=1)
    first = residual_net()
    profile_model(first, (3, 32, 32), FakeBackend(), cfg, progress=False, store=store)
    dev = device_key(FakeBackend().fingerprint((3, 32, 32)))
    sigs = {s.key: s for s in layer_signatures(first, (3, 32, 32)).values()}
    before = {(shape_key(s), ci, co) for s in sigs.values() for ci, co in store.get_layer(dev, shape_key(s))}
    second = residual_net(7)  # every conv shape shared; the classifier is new
    be = FakeBackend()
    t = profile_model(second, (3, 32, 32), be, cfg, progress=False, store=store)
    sig_of = {lt.signature.key: lt.signature for lt in t.layers.values()}
    measured = {(shape_key(sig_of[k]), ci, co) for k, ci, co in be.layers_timed[1:]}  # [0]: the warm-up
    assert measured and not measured & before
    assert t.meta["from_store"] > 0 and t.meta["measured"] == len(measured)


def _writer(path, worker, n):
    with LatencyStore(path) as s:
        for i in range(n):
            s.put(device_key(FP), f"shape{worker}", i + 1, 1, Entry(1.0 + i, 0.0, 3))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    LatencyStore(path).close()
    ctx = multiprocessing.get_context("fork")  # the writers use sqlite alone
    procs = [ctx.Process(target=_writer, args=(path, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with LatencyStore(path) as s:
        assert [len(s.get_layer(device_key(FP), f"shape{w}")) for w in range(3)] == [150, 150, 150]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "schema"])
def test_a_damaged_store_is_moved_aside_and_rebuilt(tmp_path, caplog, damage):
    path = tmp_path / "s.sqlite"
    with LatencyStore(path) as s:
        for i in range(200):
            s.put(device_key(FP), shape_key(SIG), i + 1, 8, Entry(1.0, 0.0, 3))
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    else:
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(STORE_SCHEMA + 1),))
        db.commit()
        db.close()
    with caplog.at_level(logging.WARNING), LatencyStore(path) as s:
        assert s.get_layer(device_key(FP), shape_key(SIG)) == {}  # a new, empty store
        s.put(device_key(FP), shape_key(SIG), 8, 8, Entry(1.0, 0.0, 3))  # and a working one
    assert "moved it to" in caplog.text
    assert len(list(tmp_path.glob("s.sqlite.damaged-*"))) == 1


def test_export_import_moves_entries_to_another_store(tmp_path):
    with LatencyStore(tmp_path / "a.sqlite") as a:
        a.put(device_key(FP), shape_key(SIG), 8, 8, Entry(1.0, 0.01, 3))
        a.put_period(device_key(FP), "conv", "in", 16)
        assert a.export(tmp_path / "e.json") == 1
    with LatencyStore(tmp_path / "b.sqlite") as b:
        b.put(device_key(FP), shape_key(SIG), 8, 8, Entry(2.0, 0.01, 3))
        assert b.import_(tmp_path / "e.json") == (0, [device_key(FP)])  # kept what it had
        assert b.get_layer(device_key(FP), shape_key(SIG))[(8, 8)].median_ms == 2.0
        assert b.import_(tmp_path / "e.json", replace=True)[0] == 1
        assert b.get_layer(device_key(FP), shape_key(SIG))[(8, 8)].median_ms == 1.0
        assert b.get_period(device_key(FP), "conv", "in") == 16


def test_tables_commands(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    profile_model(residual_net(), (3, 32, 32), FakeBackend(), ProfileConfig(fit_configs=1), progress=False,
                  store=LatencyStore(store))
    assert main(["tables", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "fake-device (another machine)" in out and "entries on 1 device key(s)" in out
    assert main(["tables", "export", str(tmp_path / "e.json"), "--store", str(store)]) == 0
    n = json.loads((tmp_path / "e.json").read_text())["entries"]
    assert main(["tables", "import", str(tmp_path / "e.json"), "--store", str(tmp_path / "new.sqlite")]) == 0
    assert f"imported {len(n)} entries" in capsys.readouterr().out
    assert main(["tables", "prune", "--other-devices", "--store", str(store)]) == 0
    assert f"deleted {len(n)} entries" in capsys.readouterr().out
    assert LatencyStore(store).summary() == []


@pytest.mark.parametrize("argv, message", [
    (["tables", "prune"], "say which entries to delete"),
    (["tables", "prune", "--all", "--older-than", "-1"], "--older-than takes days"),
    (["tables", "import", "{tmp}/nope.json"], "does not exist"),
    (["tables", "import", "{tmp}/bad.json"], "is not a latency store export"),
    (["tables", "list", "--store", "{tmp}/none.sqlite"], "no latency store at"),
])
def test_tables_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text('{"entries": 3}')
    LatencyStore(tmp_path / "s.sqlite").close()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--store" not in argv:
        argv += ["--store", str(tmp_path / "s.sqlite")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_store_that_cannot_be_opened_is_kept_and_refused_in_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with pytest.raises(Exception) as e:
        LatencyStore(folder)  # a folder, not a file
    assert type(e.value).__name__ == "BadInput" and "is a folder" in str(e.value)
    path = tmp_path / "s.sqlite"
    LatencyStore(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds it locked
    try:
        s = LatencyStore.__new__(LatencyStore)
        s.path = path
        s._connect = lambda: sqlite3.connect(path, timeout=0.1, isolation_level=None)
        with pytest.raises(Exception) as e:
            s._open()
        assert type(e.value).__name__ == "BadInput" and "cannot open the latency store" in str(e.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert path.exists() and not list(tmp_path.glob("s.sqlite.damaged-*"))  # a locked store is not "damaged"
