"""`python -m benchmarks` plumbing: sections hand rows back, a missing peer is a labelled skip, the
results file names the CPU and keeps one part per CPU kind. Speed itself is measured by the
benchmarks, never asserted here."""
import subprocess
import sys

from benchmarks.__main__ import ONLY_WHEN_ASKED, SECTIONS, cpu_kind, read_results, run_section, write_results
from benchmarks.common import JSON_MARKER, machine, markdown_table, paired_ratios, row
from workbench.paths import REPO_ROOT


def test_missing_peer_is_a_labelled_skip_and_results_name_the_cpu(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "peer", "--peer-python",
                           str(tmp_path / "no-such-python"), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert f"## CPU: {cpu_kind(machine())}" in text
    assert "native bf16:" in text and "cores" in text and "torch threads" in text
    assert "| peer (timm) |" in text and "skipped" in text and "no-such-python" in text


def test_a_run_replaces_only_its_own_tables_in_its_own_cpu_part(tmp_path):
    out = tmp_path / "results.md"
    write_results(out, {"CPU A": {"data: old": "run 1\n\n| a |", "moe: kept": "run 1\n\n| b |"},
                        "CPU B": {"data: other machine": "run 0\n\n| c |"}})
    kinds = read_results(out)
    assert list(kinds) == ["CPU A", "CPU B"] and kinds["CPU A"]["moe: kept"].strip() == "run 1\n\n| b |"
    kinds["CPU A"]["data: old"] = "run 2\n\n| new |"
    write_results(out, kinds)
    again = read_results(out)
    assert again["CPU A"]["data: old"].strip() == "run 2\n\n| new |"
    assert again["CPU A"]["moe: kept"].strip() == "run 1\n\n| b |"
    assert again["CPU B"] == kinds["CPU B"]


def test_a_simulated_isa_is_named_as_such(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    m = machine()
    assert "simulated" in m["isa"] and "ONEDNN_MAX_CPU_ISA=AVX2" in m["isa"] and m["native_bf16"] is False
    assert "simulated" in cpu_kind(m)


def test_a_failing_section_becomes_a_row_not_a_crash(tmp_path):
    rows, machine_ = run_section("benchmarks.no_such_section", sys.executable, quick=True, log=open("/dev/null", "w"))
    assert machine_ is None
    assert rows[0]["ours"] == "skipped" and "exit" in rows[0]["comparison"]


def test_every_section_module_exists_and_takes_json_and_quick():
    """One interpreter for all sections (each would otherwise pay the torch import)."""
    check = ("import contextlib, io, runpy, sys\n"
             "for module in sys.argv[1:]:\n"
             "    sys.argv, buf = [module, '--help'], io.StringIO()\n"
             "    with contextlib.redirect_stdout(buf):\n"
             "        try:\n"
             "            runpy.run_module(module, run_name='__main__')\n"
             "        except SystemExit:\n"
             "            pass\n"
             "    assert '--json' in buf.getvalue() and '--quick' in buf.getvalue(), module\n")
    modules = [module for module, _ in SECTIONS.values()]
    proc = subprocess.run([sys.executable, "-c", check, *modules], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert ONLY_WHEN_ASKED <= set(SECTIONS)


def test_table_formats_each_kind_of_ratio():
    rows = [row("s", "a", "10 ms", "20 ms", 2.0, "speed-up", "≥ 2×", True),
            row("s", "b", "100 GFLOP/s", "400 GFLOP/s", 0.25, "fraction of peak"),
            row("s", "c", "skipped", "why", None, "")]
    table = markdown_table(rows)
    assert "2.00× (speed-up)" in table and "25% (of peak)" in table and "| ✓ |" in table
    assert JSON_MARKER.endswith(":")


def test_paired_ratios_cancel_a_slow_phase_that_hits_both_models_of_a_round():
    # rounds 0-1 ran while the machine was twice as slow; the MoE is 10 % slower in every round
    times = {"dense": [2.0, 2.0, 1.0, 1.0, 1.0, 1.0], "image": [2.2, 2.2, 1.1, 1.1, 1.1, 1.1]}
    median, q1, q3 = paired_ratios(times, "image", "dense")
    assert abs(median - 1.1) < 1e-9 and abs(q1 - 1.1) < 1e-9 and abs(q3 - 1.1) < 1e-9
    # a noisy round widens the quartiles but barely moves the median
    times["image"][3] = 1.5
    median, q1, q3 = paired_ratios(times, "image", "dense")
    assert abs(median - 1.1) < 1e-9 and q3 > 1.1
