"""bench/run.py's pure parts: py-spy's raw output, per-process CPU, ratios, targets, order."""

import argparse
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import run  # noqa: E402  (bench/run.py)


def args(**kw):
    a = dict(cpus=["0", "all"], modes=["1/msg", "reuse", "e2e-1/msg", "e2e-reuse"])
    a.update(kw)
    return argparse.Namespace(**a)


def result(mta, mode, rate, cpus="all", run_=1, **kw):
    r = {"mta": mta, "mode": mode, "cpus": cpus, "run": run_, "ok": True, "rate": rate,
         "mta_cpu_ms_per_msg": 1.0, "other_cpu_s": 0.0}
    if mode in ("1/msg", "reuse"):
        r["probe"] = {"samples_ms": kw.pop("samples", [1.0])}
    if mode in ("e2e-1/msg", "e2e-reuse"):
        r["accept_rate"] = rate
    r.update(kw)
    return r


def test_own_time_counts_leaf_frames_per_function_and_thread(tmp_path):
    raw = tmp_path / "py-spy.txt"
    raw.write_text(
        "thread (1): MainThread;main (a.py:1);loop (a.py:5);write (t.py:3) 30\n"
        "thread (1): MainThread;main (a.py:1);loop (a.py:5) 10\n"
        "thread (2): writer;run (s.py:9);write (t.py:3) 20\n"
        "thread (2): writer;run (s.py:9);commit (s.py:40) 40\n")
    prof = run.own_time(str(raw), rate=100, messages=1000, top=2)
    assert prof["samples"] == 100
    assert [(e["function"], e["samples"]) for e in prof["top_own"]] == [
        ("write (t.py:3)", 50), ("commit (s.py:40)", 40)]
    assert prof["top_own"][0]["share"] == pytest.approx(0.5)
    assert prof["top_own"][0]["ms_per_msg"] == pytest.approx(50 * 10 / 1000)
    assert {t["function"]: t["samples"] for t in prof["threads"]} == {
        "thread (1): MainThread": 40, "thread (2): writer": 60}


def test_summary_ratios_vs_postfix_w1_and_first_cpu_setting():
    results = []
    for i, (pf, w1, w2) in enumerate([(500, 900, 1500), (520, 1000, 1700), (480, 950, 1600)], 1):
        results += [result("postfix", "e2e-1/msg", pf, run_=i), result("txmta-w1", "e2e-1/msg", w1, run_=i),
                    result("txmta-w2", "e2e-1/msg", w2, run_=i),
                    result("txmta-w2", "e2e-1/msg", w2 / 2, cpus="0", run_=i)]
    rows = {(r["cpus"], r["mta"]): r for r in run.summarize(results, args())}
    w2 = rows["all", "txmta-w2"]
    assert w2["vs_postfix"] == pytest.approx(1600 / 500)
    assert w2["vs_w1"] == pytest.approx(1600 / 950)
    assert w2["vs_cpus0"] == pytest.approx(2.0)
    assert w2["vs_postfix_paired"] == pytest.approx([3.0, 1700 / 520, 1600 / 480])
    assert "vs_postfix" not in rows["all", "postfix"]
    assert "vs_w1" not in rows["all", "txmta-w1"]
    assert "vs_cpus0" not in rows["0", "txmta-w2"]


def test_summary_adds_per_process_cpu_and_affinity():
    procs = lambda w0, w1: {"master": {"ms_per_msg": 0.1, "procs": 1},   # noqa: E731
                            "worker 0": {"ms_per_msg": w0, "procs": 1},
                            "worker 1": {"ms_per_msg": w1, "procs": 1}}
    results = [result("txmta-w2", "e2e-reuse", 1000, cpus="0", run_=i, processes=procs(w0, w1),
                      unattributed_ms_per_msg=0.0, affinity={"0": 3})
               for i, (w0, w1) in enumerate([(0.5, 0.4), (0.7, 0.6), (0.6, 0.5)], 1)]
    [row] = run.summarize(results, args())
    assert row["processes"] == {"master": 0.1, "worker 0": 0.6, "worker 1": 0.5}
    assert row["affinity"] == {"0": 9}
    assert run.fmt_processes(row) == "worker 0 0.60, worker 1 0.50, master 0.10"


def test_targets_are_checked_for_the_most_workers_on_all_cpus():
    results = [result("postfix", "reuse", 500, samples=[5.0] * 99 + [40.0]),
               result("txmta-w1", "reuse", 800), result("txmta-w2", "reuse", 1500, samples=[3.0] * 100),
               result("postfix", "e2e-reuse", 500), result("txmta-w1", "e2e-reuse", 800),
               result("txmta-w2", "e2e-reuse", 700)]
    a = args(modes=["reuse", "e2e-reuse"])
    targets = {(t["target"], t["mode"]): t for t in run.check_targets(run.summarize(results, a), a)}
    assert all(t["mta"] == "txmta-w2" for t in targets.values())
    assert targets["intake >= 2.5 x Postfix", "reuse"]["met"] is True
    assert targets["p99 end of data -> 250 <= 15 ms under load", "reuse"]["value"] == 3.0
    assert targets["end to end >= 1.8 x Postfix", "e2e-reuse"]["met"] is False
    assert targets["txmta-w2 >= 1.6 x txmta-w1", "e2e-reuse"]["met"] is False


def test_a_cell_without_successful_runs_is_a_target_without_value():
    results = [result("postfix", "reuse", 500), dict(result("txmta-w2", "reuse", 0), ok=False)]
    a = args(modes=["reuse"])
    [t] = [t for t in run.check_targets(run.summarize(results, a), a) if "Postfix" in t["target"]]
    assert t["value"] is None and t["met"] is None


def test_variant_order_rotates_per_repetition():
    v = ["postfix", "txmta-w1", "txmta-w2"]
    assert [run.rotated(v, i) for i in range(4)] == [
        v, ["txmta-w1", "txmta-w2", "postfix"], ["txmta-w2", "postfix", "txmta-w1"], v]


def test_pinning_prefix():
    assert run.pin_argv("all") == []
    assert run.pin_argv("0") == ["taskset", "-c", "0"]


def test_sampler_counts_cpu_of_a_child_from_its_reading_at_start():
    """A process that burns CPU during the window shows that CPU, not what it used before."""
    child = subprocess.Popen([sys.executable, "-c", "import time\n"
                              "t=time.process_time()\n"
                              "while time.process_time()-t<0.3: pass\n"
                              "print('sleeping', flush=True)\n"
                              "time.sleep(0.5)\n"
                              "t=time.process_time()\n"
                              "while time.process_time()-t<0.2: pass\n"
                              "print('done', flush=True)\n"
                              "time.sleep(30)\n"],
                             stdout=subprocess.PIPE, text=True)
    try:
        group = run.CpuGroup.__new__(run.CpuGroup)
        group.path, group.root_pid = None, child.pid
        assert child.stdout.readline() == "sleeping\n"     # its first 0.3 s of CPU are spent
        sampler = run.ProcSampler(group, lambda pid, comm, cmdline: "child")
        sampler.start()
        assert child.stdout.readline() == "done\n"
        sampler.stop()
        cpu = sampler.by_name()["child"]["cpu_s"]
        assert 0.15 <= cpu <= 0.28
    finally:
        child.kill()
        child.wait()


def test_dedupe_off_variants_are_parsed_ordered_and_compared_in_the_same_run():
    """--dedupe on,off: txmta-wN-nodedupe runs with [intake] dedupe_window = "0"; the row
    with the check on gets its ratio to the one without (medians and per repetition)."""
    assert run.parse_variant("txmta-w2-free-nodedupe") == (2, True, True)
    assert run.parse_variant("txmta-w1") == (1, False, False)
    assert run.variant_name(2, True, True) == "txmta-w2-free-nodedupe"
    assert sorted(["txmta-w1-nodedupe", "postfix", "txmta-w1"], key=run.variant_key) == [
        "postfix", "txmta-w1", "txmta-w1-nodedupe"]
    results = []
    for i, (on, off) in enumerate([(960, 1000), (990, 1000), (1000, 1010)], 1):
        results += [result("txmta-w1", "reuse", on, run_=i),
                    result("txmta-w1-nodedupe", "reuse", off, run_=i)]
    rows = {r["mta"]: r for r in run.summarize(results, args(cpus=["all"], modes=["reuse"]))}
    assert rows["txmta-w1"]["vs_nodedupe"] == pytest.approx(990 / 1000)   # medians
    assert rows["txmta-w1"]["vs_nodedupe_paired"] == pytest.approx([0.96, 0.99, 1000 / 1010])
    assert "vs_nodedupe" not in rows["txmta-w1-nodedupe"]


def test_a_nodedupe_variant_turns_the_check_off_in_its_config(tmp_path):
    bench = run.Bench(argparse.Namespace(workdir=str(tmp_path), txmta_server={}, port=2525,
                                         sink_port=2501))
    mta = bench.new_mta("txmta-w1-nodedupe", "t")
    mta.configure()
    assert '[intake]\ndedupe_window = "0"' in mta.settings()
    mta = bench.new_mta("txmta-w1", "t")
    mta.configure()
    assert "dedupe_window" not in mta.settings()
