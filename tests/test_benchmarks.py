"""`python -m benchmarks` plumbing: sections hand rows back, a missing peer is a labelled skip, the
results file describes the machine. Speed itself is measured by the benchmarks, never asserted here."""
import subprocess
import sys

from benchmarks.__main__ import SECTIONS, run_section
from benchmarks.common import JSON_MARKER, markdown_table, row
from workbench.paths import REPO_ROOT


def test_missing_peer_is_a_labelled_skip_and_results_describe_the_machine(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "peer", "--peer-python",
                           str(tmp_path / "no-such-python"), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "Machine:" in text and "torch" in text and "cores" in text
    assert "| peer (timm) |" in text and "skipped" in text and "no-such-python" in text


def test_a_failing_section_becomes_a_row_not_a_crash(tmp_path):
    rows, machine = run_section("benchmarks.no_such_section", sys.executable, quick=True, log=open("/dev/null", "w"))
    assert machine is None
    assert rows[0]["ours"] == "skipped" and "exit" in rows[0]["comparison"]


def test_every_section_module_exists_and_takes_json_and_quick():
    for module, _ in SECTIONS.values():
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (module, proc.stderr[-500:])
        assert "--json" in proc.stdout and "--quick" in proc.stdout


def test_table_formats_each_kind_of_ratio():
    rows = [row("s", "a", "10 ms", "20 ms", 2.0, "speed-up", "≥ 2×", True),
            row("s", "b", "100 GFLOP/s", "400 GFLOP/s", 0.25, "fraction of peak"),
            row("s", "c", "skipped", "why", None, "")]
    table = markdown_table(rows)
    assert "2.00× (speed-up)" in table and "25% (of peak)" in table and "| ✓ |" in table
    assert JSON_MARKER.endswith(":")
