"""The benchmark suite's plumbing: a tiny CPU sweep in fresh processes, its record and charts."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.append(str(BENCH))      # after tests/: spawned gloo workers must find tests/conftest.py as `conftest`


@pytest.mark.slow
def test_cpu_suite_tiny_sweep_and_charts(tmp_path, monkeypatch):
    import cpu_harness
    import suite
    from plot import plot_suite

    monkeypatch.setattr(suite, "CPU_PROVIDERS", {"logits": ("naive", "trl", "cpp", "cpp_inplace"),
                                                 "linear": ("naive", "trl_fused", "matmul_floor", "matmul_floor_scored",
                                                            "cpp", "one_pass")})
    monkeypatch.setattr(suite, "MODELS", {"tiny": (32, 2000)})
    result = suite.run_cpu(["logits", "linear"], "tiny", (1024,), 1, masks=((0.125, 0.0), (0.25, 0.25)), rounds=1)
    # per mask: logits 4 providers forward+backward, 3 forward (in place changes only the backward);
    # linear 6 and 5 (the one-pass loss differs from cpp only when gradients are formed)
    assert len(result["rows"]) == 2 * (4 + 3 + 6 + 5)
    for row in result["rows"]:
        assert "error" not in row, row                     # every provider passed its correctness gate
        assert row["scored_tokens"] == (896 if row["masked"] == 0.125 else 512)
        assert row["median_s"] > 0 and row["floor_scored_s"] > 0 and row["floor_all_s"] > 0
        if row["workload"] == "logits":                    # bytes over bandwidth: exactly proportional
            assert row["floor_scored_s"] / row["floor_all_s"] == pytest.approx(row["scored_tokens"] / 1024)
    fwd_floor = next(r for r in result["rows"] if r["workload"] == "linear" and r["mode"] == "fwd"
                     and r["provider"] == "matmul_floor_scored" and r["masked"] == 0.25)
    assert fwd_floor["fraction_of_floor_scored"] == 1.0
    assert result["limits"]["copy_bandwidth_bytes_per_s"] > 1e8 and result["limits"]["matmul_flop_per_s"] > 1e8
    path = cpu_harness.write_record("suite_cpu", {"device": "cpu", "threads": 2, **result}, tmp_path)
    assert set(json.loads(path.read_text())) >= {"commit", "dirty", "date", "torch"}
    assert json.loads(path.read_text())["rows"][0]["workload"] == "logits"
    charts = plot_suite(path)
    assert [c.name for c in charts] == ["suite_cpu_linear_fwd.png", "suite_cpu_linear.png",
                                        "suite_cpu_logits_fwd.png", "suite_cpu_logits.png"]
    assert all(c.stat().st_size > 5000 for c in charts)


def test_bench_cli_rejects_an_unknown_workload():
    from robalign.app.commands.cli import main

    assert main(["bench", "--workload", "nope"]) == 2


def test_the_suite_writes_into_out_never_into_the_committed_records(tmp_path, monkeypatch):
    """``robalign bench`` / suite.py write where --out says (default ./robalign-bench); the
    committed records in benchmarks/results are untouched."""
    import suite

    committed = {p.name: p.stat().st_mtime_ns for p in (BENCH / "results").glob("*")}
    canned = {"limits": {"copy_bandwidth_bytes_per_s": 1e10, "matmul_flop_per_s": 1e11},
              "rows": [{"workload": "logits", "mode": "fwdbwd", "tokens": 64, "vocab": 100, "hidden": 8,
                        "masked": 0.125, "padding": 0.0, "scored_tokens": 56, "provider": p, "median_s": t,
                        "min_s": t, "max_s": t, "peak_above_inputs_mb": 1.0}
                       for p, t in (("trl", 2e-3), ("cpp", 1e-3))]}
    monkeypatch.setattr(suite, "run_cpu", lambda *args, **kwargs: suite.derive_floors(canned))
    monkeypatch.chdir(tmp_path)
    assert suite.main(["--workload", "logits", "--mode", "fwdbwd", "--quick"]) == 0
    assert (tmp_path / "robalign-bench" / "suite_cpu.json").is_file()
    assert suite.main(["--workload", "logits", "--mode", "fwdbwd", "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "suite_cpu.json").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (BENCH / "results").glob("*")} == committed


def test_quick_is_one_small_case_per_workload_with_every_provider(tmp_path, monkeypatch):
    """``--quick`` took 15–19 minutes (two token counts, the masked sweep, both modes): now one case
    a workload, forward+backward, one round, and still every provider; the full sweep shows its
    progress. (The runs themselves are timed in the note, not here.)"""
    import suite

    plans = []

    def planned(workloads, model, tokens, repeat, modes, masks=suite.MASKS, rounds=2, progress=False, **_):
        plans.append(dict(workloads=workloads, tokens=tokens, repeat=repeat, modes=list(modes), masks=masks,
                          rounds=rounds, progress=progress))
        return suite.derive_floors({"limits": {"copy_bandwidth_bytes_per_s": 1e10, "matmul_flop_per_s": 1e11},
                                    "rows": []})

    import plot

    monkeypatch.setattr(suite, "run_cpu", planned)
    monkeypatch.setattr(plot, "plot_suite", lambda path: [])
    monkeypatch.chdir(tmp_path)
    assert suite.main(["--quick"]) == 0
    assert suite.main([]) == 0
    quick, full = plans
    assert quick == dict(workloads=["logits", "linear"], tokens=(512,), repeat=3, modes=["fwdbwd"],
                         masks=suite.MASKS[:1], rounds=1, progress=False)
    assert full == dict(workloads=["logits", "linear"], tokens=(512, 1024, 2048, 4096), repeat=5,
                        modes=list(suite.MODES), masks=suite.MASKS, rounds=2, progress=True)
    assert all(p in suite.providers_for(w, "fwdbwd") for w, ps in suite.CPU_PROVIDERS.items() for p in ps)


def test_bench_cli_refuses_a_file_as_out(tmp_path, capsys):
    from robalign.app.commands.cli import main

    target = tmp_path / "f.json"
    target.write_text("{}")
    assert main(["bench", "--out", str(target)]) == 2
    assert capsys.readouterr().err.strip() == f"robalign bench: --out {target} is a file; give a folder"


@pytest.mark.slow
def test_one_pass_options_benchmark_runs_its_providers_through_the_gate(tmp_path):
    import cpu_one_pass

    assert cpu_one_pass.main(["--tokens", "256", "--hidden", "32", "--vocab", "2000", "--repeat", "1",
                              "--rounds", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu_one_pass_N256_H32_V2000.json").read_text())
    rows = {r["provider"]: r for r in record["rows"]}
    assert set(rows) == set(cpu_one_pass.PROVIDERS) and not any("error" in r for r in rows.values())
    assert record["sub_chunk_mb"] * 2**20 // (2000 * 4) < 224          # a chunk below a group's 224 tokens
    for name in ("one_pass", "one_pass_sub_chunked", "recompute", "recompute_sub_chunk_size"):
        assert rows[name]["grad_w_rel_error"] < 1e-5
    for name in ("bf16_fp32_head_grad", "bf16_head_dtype_grad"):
        assert rows[name]["grad_w_rel_error"] < 2e-2


def test_soft_capped_linear_benchmark_gates_every_provider_with_the_cap(tmp_path):
    """``cpu_linear.py --softcap``: every provider passes its gate against the capped float64
    reference (an ``_uncapped`` one against the plain one), so the cap's cost is a ratio of one run."""
    import cpu_linear

    providers = ["naive", "trl_fused", "cpp", "one_pass", "one_pass_uncapped"]
    assert cpu_linear.main(["--tokens", "256", "--hidden", "32", "--vocab", "500", "--repeat", "1", "--rounds", "1",
                            "--softcap", "3", "--providers", ",".join(providers), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu_linear_N256_H32_V500_softcap3.json").read_text())
    assert record["softcap"] == 3.0
    assert [r["provider"] for r in record["rows"]] == providers and not any("error" in r for r in record["rows"])


def test_gpu_linear_script_gates_every_provider_on_cpu_with_a_soft_cap(tmp_path):
    """The GPU check's soft-cap stage (gpu_linear.py --softcap) as a CPU smoke run: every provider,
    capped or ``_uncapped``, passes its gate, and each row records the cap it ran with."""
    import gpu_linear

    providers = ["naive", "trl_fused", "cpp", "cpp_uncapped", "one_pass", "one_pass_uncapped"]
    assert gpu_linear.main(["--device", "cpu", "--quick", "--masks", "0.125/0", "--softcap", "3",
                            "--providers", ",".join(providers), "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu_linear_*_softcap3.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["provider"] for r in rows] == providers and not any("error" in r for r in rows)
    assert [r["softcap"] for r in rows] == [None if p.endswith("_uncapped") else 3.0 for p in providers]


@pytest.mark.slow
def test_dro_sets_benchmark_records_every_configuration(tmp_path):
    import cpu_dro_sets

    assert cpu_dro_sets.main(["--steps", "2", "--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu_dro_sets.json").read_text())["rows"]
    assert [r["config"] for r in rows] == list(cpu_dro_sets.CONFIGS)
    assert all(r["seconds_per_step"] > 0 for r in rows)


def test_a_record_is_dirty_for_changed_code_not_for_changed_records(tmp_path, monkeypatch):
    """A second benchmark run after a first one rewrote its record measures the same commit: the
    records under benchmarks/results do not make it dirty; a changed source file does."""
    import importlib.util
    import shutil
    import subprocess

    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_harness.py", bench)
    (bench / "results" / "r.json").write_text("{}")
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.delenv("ROBALIGN_COMMIT", raising=False)
    spec = importlib.util.spec_from_file_location("copied_harness", bench / "gpu_harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    assert harness.git_state()["dirty"] is False
    (bench / "results" / "r.json").write_text('{"rows": []}')
    assert harness.git_state()["dirty"] is False
    (bench / "gpu_harness.py").write_text((bench / "gpu_harness.py").read_text() + "\n# changed\n")
    assert harness.git_state()["dirty"] is True


def test_a_provider_that_raises_in_its_gate_is_a_failed_row_not_the_end_of_the_sweep():
    """A GPU stage runs many providers; one that raises while it is gated (out of memory, a kernel
    its Triton cannot launch) is a row that says so, and the providers after it still run."""
    import gpu_harness

    def check(provider):
        if provider == "broken":
            raise RuntimeError("0 active drivers ([]). There should only be one.\nmore")
        if provider == "absent":
            raise ImportError("No module named 'absent'")
        return "failed the correctness gate: output 0 differs" if provider == "wrong" else None

    rows = gpu_harness.measure_providers(["broken", "absent", "wrong", "fine"], lambda p: (lambda: None), "cpu",
                                         "test", lambda s: {"derived": s}, check)
    assert [r["provider"] for r in rows] == ["broken", "absent", "wrong", "fine"]
    assert rows[0]["error"] == "RuntimeError: 0 active drivers ([]). There should only be one."
    assert rows[1]["error"] == "not importable (No module named 'absent')"
    assert rows[2]["error"].startswith("failed the correctness gate")
    assert "error" not in rows[3] and rows[3]["median_ms"] >= 0 and "derived" in rows[3]


def test_a_cpu_provider_whose_process_crashes_is_a_failed_row(tmp_path):
    """CPU providers run in fresh processes; one that crashes (a segfault, an exception outside its
    gate) is a row with its exit status and last line of stderr, and the others still run."""
    import cpu_harness

    script = tmp_path / "child.py"
    script.write_text("import json, sys\n"
                      "provider = sys.argv[2]\n"
                      "if provider == 'crash':\n"
                      "    raise SystemExit('RuntimeError: the kernel faulted')\n"
                      "print(json.dumps({'provider': provider, 'times_s': [0.5, 0.25], 'peak_above_inputs_mb': 1.0}))\n")
    rows = cpu_harness.run_providers(str(script), ["crash", "fine"], [], rounds=2)
    assert rows[0] == {"provider": "crash", "error": "exited with status 1: RuntimeError: the kernel faulted"}
    assert rows[1]["provider"] == "fine" and rows[1]["median_s"] == pytest.approx(0.375)


TINY_POINT = {"tokens": 512, "prompt": 0.25, "vocab": 1000, "hidden": 32, "objective": "dpo", "chunks": "rule",
              "fp32_head_grad": True}


def test_sweep_point_is_gated_timed_and_charted(tmp_path, monkeypatch, capsys):
    """benchmarks/cpu_sweep.py on a tiny point, in process: the one-pass loss passes its float64
    gate (and in bfloat16 records the materialised logits' error next to its own), both providers
    are timed interleaved, the table gives each point's rounds' spread and names the worst point,
    and the chart is drawn."""
    import cpu_harness
    import cpu_sweep
    from plot import plot_cpu_sweep

    monkeypatch.setattr(cpu_sweep, "points", lambda: {"tiny": dict(TINY_POINT),
                                                      "tiny_pl": {**TINY_POINT, "objective": "plackett_luce"}})
    rows = [cpu_sweep.measure(name, 2, dtype, flush_mb=flush) for dtype, flush in (("float32", 0), ("bfloat16", 1))
            for name in ("tiny", "tiny_pl")]
    assert [r["flush_mb"] for r in rows] == [0, 0, 1, 1]
    for row in rows:
        assert "error" not in row, row
        assert row["scored_tokens"] == 384 and len(row["times_s"]["loss"]) == 2 and row["ratio"] > 0
        assert row["grad_weight_rel_error"] < cpu_sweep.GATE[row["dtype"]]
        q1, q3 = row["ratio_quartiles"]
        assert q1 <= row["ratio"] <= q3
        t = row["times_s"]                  # each round's floor: the fastest form of the three products
        forms = ["floor_rows", "floor_columns"] + (["floor_rows_decomposed"] if row["dtype"] == "bfloat16" else [])
        assert [k for k in t if k.startswith("floor_")] == forms     # the decomposed form: half precision only
        assert t["floor"] == [min(f) for f in zip(*(t[k] for k in forms))] and len(t["floor"]) == 2
        assert row["floor_s"] <= max(row["floor_rows_s"], row["floor_columns_s"])
    assert rows[1]["group"] == 4
    cpu_sweep.print_table(rows)
    table = capsys.readouterr().out
    assert f"| {rows[0]['ratio']:.3f} | {rows[0]['ratio_quartiles'][0]:.2f}–" in table
    assert "float32: worst point" in table and "bfloat16: worst point" in table
    bf16 = rows[2]
    assert 0 < bf16["materialised_grad_weight_rel_error"] < 2e-2 and bf16["error_vs_materialised"] <= 2
    path = cpu_harness.write_record("cpu_sweep", {"benchmark": "cpu_sweep", "limits": cpu_sweep.LIMITS,
                                                  "gate": cpu_sweep.GATE, "repeat": 2, "rows": rows}, tmp_path)
    (chart,) = plot_cpu_sweep(path)
    assert chart.stat().st_size > 5000
    assert json.loads(path.read_text())["cpu"] == cpu_harness.cpu_description() != ""   # which machine ran it


def test_sweep_states_the_float32_accumulation_cost_and_keeps_it_out_of_the_worst_point(capsys):
    """The bfloat16-accumulation point is measured with ``fp32_head_grad=False`` (its chunk rule
    too), left out of the worst point (not the default path), and set beside the default's
    several-chunks point as the float32 accumulation's cost."""
    import cpu_sweep

    opt_out = cpu_sweep.points()[cpu_sweep.HALF_ONLY]
    assert opt_out == {**cpu_sweep.points()["several_chunks"], "fp32_head_grad": False}

    def row(point, ratio, **extra):
        return {"dtype": "bfloat16", "point": point, **cpu_sweep.BASE, "scored_tokens": 1536, "chunk_tokens": 393,
                "loss_s": ratio * 0.1, "floor_s": 0.1, "ratio": ratio, "ratio_quartiles": [ratio, ratio],
                "grad_weight_rel_error": 3e-3, **extra}

    cpu_sweep.print_table([row("base", 1.14), row("several_chunks", 1.20),
                           row(cpu_sweep.HALF_ONLY, 1.25, fp32_head_grad=False)])
    out = capsys.readouterr().out
    assert "bfloat16: worst point several_chunks at 1.200×" in out
    assert "1.200× the floor accumulating the head's gradient in float32 (the default), 1.250× in bfloat16" in out
    legacy = {k: v for k, v in row("several_chunks", 1.5).items() if k != "fp32_head_grad"}
    cpu_sweep.print_table([row("base", 1.1), legacy])           # a record from before the opt-out point
    assert "worst point several_chunks at 1.500×" in capsys.readouterr().out


def test_sweep_point_off_the_reference_is_a_failed_row(monkeypatch):
    import cpu_sweep

    monkeypatch.setattr(cpu_sweep, "points", lambda: {"tiny": dict(TINY_POINT)})
    monkeypatch.setitem(cpu_sweep.GATE, "float32", 1e-12)           # a bound no float32 loss meets
    row = cpu_sweep.measure("tiny", 1, "float32")
    assert row["error"].startswith("failed the correctness gate") and "ratio" not in row


def test_sweep_several_chunks_keep_groups_whole():
    import cpu_sweep

    env = cpu_sweep._chunk_env({**cpu_sweep.BASE, "chunks": "quarter"}, "float32")
    chunk = int(env["ROBALIGN_CHUNK_MB"]) * 2**20 // (cpu_sweep.BASE["vocab"] * 4)
    assert 384 <= chunk < 768                        # one group of 2 × 192 scored tokens a chunk: 4 chunks


@pytest.mark.slow
def test_train_step_arms_agree_on_the_loss_and_are_timed(monkeypatch):
    """benchmarks/train_step.py on a tiny Llama, in process: robalign's DoRADPOTrainer, TRL's
    DPOTrainer and Liger's fused loss in a plain loop give TRL's first losses, and each arm records
    its step times, throughput and peak memory; λ = 1 DoRA's loss is not compared."""
    import train_step

    pytest.importorskip("liger_kernel", reason="Liger-Kernel is in robalign[bench]")
    monkeypatch.setitem(train_step.MODELS, "tiny", dict(arch="llama", hidden=32, intermediate=64, heads=2,
                                                        kv_heads=1, vocab=500, layers=2))
    rows = []
    for arm in ("robalign", "robalign_dora", "trl", "liger"):
        row = train_step.measure(arm, "tiny", 1024, "float32", layers=1, steps=2, warmup=1)
        assert len(row["losses"]) == 3 and len(row["step_times_s"]) == 3 and row["tokens_per_s"] > 0
        assert row["tokens_per_step"] == 2 * 2 * (train_step.PROMPT + train_step.COMPLETION)
        rows.append(row)
    train_step._check_losses(rows)
    assert [r.get("losses_match_trl") for r in rows] == [True, None, None, True]
    assert rows[0]["losses"][0] == pytest.approx(0.6931, abs=1e-4)      # log 2: the policy is the reference
    assert rows[0]["first_logps_chosen"] == pytest.approx(rows[2]["first_logps_chosen"], rel=1e-5)
    train_step.print_table(rows)
