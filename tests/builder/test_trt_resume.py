"""Resumable TensorRT builds, failures that do not abort, fused engines built on demand, and
the node's hook that runs those builds in the background — against the stand-ins of the
documented TensorRT 10 API in ``tests/engines/test_trt.py``.

The stand-in engines compute ``2x + 1``, not the model, so the engine-against-ONNX-Runtime
check is replaced by one that records its calls (and fails where a test asks it to)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import builder.trt_build as trt_build
import builder.trt_stage as trt_stage
from appliance.data.fused_builds import FusedBuilds
from builder.progress import SilentReporter
from builder.segments import segment_filename
from builder.trt_build import Agreement
from builder.trt_ondemand import build_missing_segment
from builder.trt_ondemand import main as ondemand_main
from builder.trt_resume import (
    BuildJournal,
    DoneEngine,
    EngineProgress,
    measured_seconds_per_engine,
    run_builds,
)
from builder.verify import sample_inputs
from engines.errors import BuildError, VerificationError
from engines.ort import OrtEngine
from engines.repository import ModelRepository
from engines.trt import TrtSession
from tests.conftest import BuiltModel
from tests.engines.test_trt import FakeBuilder, FakeTrt, fake_session

# --- the journal and the loop, on their own ------------------------------------------------


def test_journal_round_trip_and_unreadable_files(tmp_path: Path) -> None:
    journal = BuildJournal.open(tmp_path, "f" * 64, "orin-sm87-trt10.3.0", "fp32", True)
    assert journal.path.name == "journal-ffffffffffffffff-orin-sm87-trt10.3.0-fp32-stripped.json"
    journal.record_done(0, 2, DoneEngine("k" * 24, 10, 3.5, 1e-6))
    journal.record_failed(1, 3, "parser said no")
    again = BuildJournal.load(journal.path)
    assert again.done == {(0, 2): DoneEngine("k" * 24, 10, 3.5, 1e-6)}
    assert again.failed == {(1, 3): "parser said no"}
    journal.path.write_text("{ half a journal")
    assert BuildJournal.load(journal.path).done == {}


def test_is_done_needs_the_engine_file_whole(tmp_path: Path) -> None:
    journal = BuildJournal(tmp_path / "j.json")
    journal.record_done(0, 1, DoneEngine("a" * 24, 4, 1.0))
    assert not journal.is_done(0, 1, "a" * 24, tmp_path)  # no file
    (tmp_path / f"{'a' * 24}.engine").write_bytes(b"abc")
    assert not journal.is_done(0, 1, "a" * 24, tmp_path)  # truncated
    (tmp_path / f"{'a' * 24}.engine").write_bytes(b"abcd")
    assert journal.is_done(0, 1, "a" * 24, tmp_path)
    assert not journal.is_done(0, 1, "b" * 24, tmp_path)  # another key: other options


def test_progress_line_counts_and_eta() -> None:
    progress = EngineProgress(total=10, seconds_per_engine=9.0)
    assert progress.line() == "0 done, 0 failed, 10 remaining, eta 90 s"
    progress.done, progress.failed, progress.built, progress.built_seconds = 3, 1, 3, 6.0
    assert progress.line() == "3 done, 1 failed, 6 remaining, eta 12 s"  # this run's pace


class Notes(SilentReporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def _loop(tmp_path: Path, order: Sequence[tuple[int, int]], fail: set[tuple[int, int]],
          stop_after: int | None, built: list[tuple[int, int]]) -> Any:
    journal = BuildJournal.load(tmp_path / "journal.json")

    def build_one(start: int, end: int) -> DoneEngine:
        if stop_after is not None and len(built) == stop_after:
            raise KeyboardInterrupt
        built.append((start, end))
        if (start, end) in fail:
            raise BuildError(f"no engine for [{start}, {end})")
        key = f"{start:012d}{end:012d}"
        (tmp_path / f"{key}.engine").write_bytes(b"plan")
        return DoneEngine(key, 4, 2.0)

    return run_builds(order, key_of=lambda s, e: f"{s:012d}{e:012d}", build_one=build_one,
                      journal=journal, engine_dir=tmp_path, reporter=Notes(),
                      seconds_per_engine=1.0)


def test_run_builds_resumes_after_ctrl_c_and_records_failures(tmp_path: Path) -> None:
    order = [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3), (0, 3)]
    first: list[tuple[int, int]] = []
    with pytest.raises(KeyboardInterrupt):
        _loop(tmp_path, order, {(1, 3)}, stop_after=3, built=first)
    assert first == order[:3]
    second: list[tuple[int, int]] = []
    outcome = _loop(tmp_path, order, {(1, 3)}, stop_after=None, built=second)
    assert second == order[3:]  # only what was missing
    assert outcome.skipped == 3 and set(outcome.failed) == {(1, 3)}
    assert set(outcome.done) == set(order) - {(1, 3)}
    journal = json.loads((tmp_path / "journal.json").read_text())
    assert list(journal["failed"]) == ["1:3"]
    third: list[tuple[int, int]] = []
    _loop(tmp_path, order, set(), stop_after=None, built=third)
    assert third == [(1, 3)]  # a re-run tries the failed range again
    assert measured_seconds_per_engine(tmp_path, "x") is None  # not a device's journal


# --- build_trt over the stand-ins: killed half-way, then re-run ------------------------------


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """TensorRT 10 stand-ins for ``build_trt``; each ``TrtSession.start`` makes a new one."""
    state: dict[str, Any] = {"trts": [], "checked": [], "fail": set()}

    def start(cls: type, device_index: int = 0) -> TrtSession:
        session, trt = fake_session("10.3.0")
        state["trts"].append(trt)
        return session

    def verify(reference: Any, candidate: Any, inputs: Any, precision: str, **kw: Any
               ) -> Agreement:
        key = (candidate.start, candidate.end)
        state["checked"].append(key)
        out = candidate.infer(np.asarray(inputs))
        assert np.all(np.isfinite(out)), "a stripped plan ran before its refit"
        if key in state["fail"]:
            raise VerificationError(f"trt[{key[0]},{key[1]}) disagrees")
        return Agreement(0.0, 1.0)

    monkeypatch.setattr(TrtSession, "start", classmethod(start))
    monkeypatch.setattr(trt_stage, "require_tensorrt", lambda: 10)
    monkeypatch.setattr(trt_build, "verify_against", verify)
    yield state


def _activations(built: BuiltModel) -> list[np.ndarray]:
    manifest, model_dir = built.manifest, built.model_dir
    x = sample_inputs(manifest.input.shape, manifest.preprocessing, count=1)
    out = [x]
    for k in range(manifest.blocks):
        engine = OrtEngine(model_dir / segment_filename(k, k + 1), k, k + 1)
        x = engine.infer(x)
        engine.close()
        out.append(x)
    return out


def _build(built: BuiltModel, ranges: list[tuple[int, int]]) -> tuple[list[Any], float]:
    model_dir = built.model_dir

    def open_ort(start: int, end: int) -> OrtEngine:
        return OrtEngine(model_dir / segment_filename(start, end), start, end)

    return trt_stage.build_trt(model_dir, built.repo, ranges, built.manifest.fingerprint,
                               _activations(built), open_ort, SilentReporter(), fp16=False,
                               blocks=built.manifest.blocks, prebuild_ratio=None)


def test_a_build_killed_half_way_builds_only_what_is_missing(
    built_tiny: BuiltModel, fake_trt: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = built_tiny.manifest.blocks
    ranges = [(i, j) for i in range(blocks) for j in range(i + 1, min(i + 2, blocks) + 1)]
    real_build = FakeBuilder.build_serialized_network
    half = len(ranges) // 2

    def dies_half_way(self: FakeBuilder, network: Any, config: Any) -> bytes:
        if len(self.trt.builds) == half:
            raise KeyboardInterrupt  # Ctrl-C, or the power going
        return real_build(self, network, config)

    monkeypatch.setattr(FakeBuilder, "build_serialized_network", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _build(built_tiny, ranges)
    first: FakeTrt = fake_trt["trts"][0]
    assert len(first.builds) == half
    assert all("STRIP_PLAN" in c.flags and "REFIT_IDENTICAL" in c.flags for c in first.builds)

    monkeypatch.setattr(FakeBuilder, "build_serialized_network", real_build)
    entries, _ = _build(built_tiny, ranges)
    second: FakeTrt = fake_trt["trts"][1]
    assert len(second.builds) == len(ranges) - half  # only what was missing
    assert {(e.start, e.end) for e in entries} == set(ranges)
    # Blocks first, then fused segments; every engine checked was refitted from its ONNX.
    order = fake_trt["checked"]
    assert order[:blocks] == [(k, k + 1) for k in range(blocks)]
    assert all(Path(p).name.startswith("seg_") for p in first.refits + second.refits)
    assert all((built_tiny.model_dir / e.path).is_file() for e in entries)

    third_builds = len(fake_trt["checked"])
    _build(built_tiny, ranges)  # everything done: no build, no load, no check
    assert len(fake_trt["trts"][2].builds) == 0 and len(fake_trt["checked"]) == third_builds


def test_a_failing_fused_segment_is_recorded_and_the_build_goes_on(
    built_tiny: BuiltModel, fake_trt: dict[str, Any]
) -> None:
    fake_trt["fail"] = {(0, 2)}
    ranges = [(0, 1), (1, 2), (0, 2), (1, 3)] + [(k, k + 1) for k in range(2, 11)]
    entries, _ = _build(built_tiny, ranges)
    assert (0, 2) not in {(e.start, e.end) for e in entries}  # nodes chain [0, 1) [1, 2)
    assert (1, 3) in {(e.start, e.end) for e in entries}
    journal = next((built_tiny.repo / ".trt-cache").glob("journal-*.json"))
    assert "0:2" in json.loads(journal.read_text())["failed"]


def test_a_failing_block_engine_fails_the_build_after_the_rest(
    built_tiny: BuiltModel, fake_trt: dict[str, Any]
) -> None:
    fake_trt["fail"] = {(3, 4)}
    blocks = built_tiny.manifest.blocks
    with pytest.raises(BuildError, match=r"block engines \[3, 4\)"):
        _build(built_tiny, [(k, k + 1) for k in range(blocks)])
    assert len(fake_trt["checked"]) == blocks  # every other block was still built


# --- on demand ----------------------------------------------------------------------------


def test_build_missing_segment_adds_it_to_the_manifest(
    built_tiny: BuiltModel, fake_trt: dict[str, Any]
) -> None:
    session, trt = fake_session("10.3.0")
    try:
        entry = build_missing_segment(built_tiny.repo, "tiny", 2, 6, session=session)
        repository = ModelRepository(built_tiny.repo)
        manifest = repository.load_manifest("tiny")  # fingerprint still matches
        assert manifest.segment("trt", 2, 6) == entry
        assert manifest.fingerprint == built_tiny.manifest.fingerprint
        repository.check_file(manifest, entry.path)
        assert len(trt.builds) == 1 and trt.refits == [str(built_tiny.model_dir /
                                                           segment_filename(2, 6))]
        # The repository refits the stripped plan from the segment's own ONNX file.
        engine = repository.open_engine(manifest, 2, 6, backend="trt", trt_session=session)
        assert np.all(np.isfinite(engine.infer(_activations(built_tiny)[2])))
        engine.close()
        assert trt.refits[-1].endswith(segment_filename(2, 6))
        again = build_missing_segment(built_tiny.repo, "tiny", 2, 6, session=session)
        assert again == entry and len(trt.builds) == 1
        journal = next((built_tiny.repo / ".trt-cache").glob("journal-*.json"))
        assert "2:6" in json.loads(journal.read_text())["done"]  # a later build keeps it
    finally:
        session.close()


def test_ondemand_command_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    assert ondemand_main(["--repo", str(tmp_path), "nope", "0", "2"]) == 1
    assert "error: model 'nope' is not in the repository" in capsys.readouterr().err


# --- the node's hook ----------------------------------------------------------------------


def _state(pid: int, wanted: str) -> str:
    """The process's state letter, once it is one of ``wanted`` (signals arrive async)."""
    deadline = time.monotonic() + 5
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in wanted or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


class Launches:
    """Runs a short Python script instead of the builder; exit status by range."""

    def __init__(self, seconds: float = 0.0, codes: dict[tuple[int, int], int] | None = None):
        self.seconds = seconds
        self.codes = codes or {}
        self.commands: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        self.commands.append(list(argv))
        start, end = int(argv[-2]), int(argv[-1])
        code = self.codes.get((start, end), 0)
        script = (f"import sys, time; time.sleep({self.seconds}); "
                  f"sys.stderr.write('no engine' if {code} else ''); sys.exit({code})")
        return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)


def _wait(builds: FusedBuilds) -> list[tuple[int, int]]:
    finished: list[tuple[int, int]] = []
    deadline = time.monotonic() + 20
    while builds.running is not None and time.monotonic() < deadline:
        finished += builds.poll()
        time.sleep(0.02)
    return finished


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_fused_builds_one_at_a_time_paused_while_busy(tmp_path: Path) -> None:
    launches = Launches(seconds=0.5)
    builds = FusedBuilds(tmp_path, "tiny", launch=launches)
    try:
        builds.request(0, 1)  # a block: nothing to build
        builds.set_busy(True)
        builds.request(0, 3)
        assert builds.running is None  # busy: not started
        builds.request(0, 3)
        builds.request(3, 6)
        builds.set_busy(False)
        assert builds.running == (0, 3) and len(launches.commands) == 1
        assert launches.commands[0][-5:] == ["--repo", str(tmp_path), "tiny", "0", "3"]
        process = builds._running[1]  # type: ignore[index]
        builds.set_busy(True)
        assert builds.paused and _state(process.pid, "T") == "T"  # stopped while requests queue
        builds.set_busy(False)
        assert not builds.paused and _state(process.pid, "RSD") in "RSD"
        finished = _wait(builds)
        finished += _wait(builds)
        assert finished == [(0, 3), (3, 6)]
    finally:
        builds.close()


def test_fused_builds_record_a_failure_and_do_not_retry_it(tmp_path: Path) -> None:
    launches = Launches(codes={(1, 4): 1})
    builds = FusedBuilds(tmp_path, "tiny", launch=launches)
    builds.request(1, 4)
    assert _wait(builds) == []
    assert builds.failed == {(1, 4): "no engine"}
    builds.request(1, 4)
    assert builds.running is None and len(launches.commands) == 1


def test_fused_builds_close_stops_a_paused_build(tmp_path: Path) -> None:
    builds = FusedBuilds(tmp_path, "tiny", launch=Launches(seconds=30))
    builds.request(0, 2)
    process = builds._running[1]  # type: ignore[index]
    builds.set_busy(True)
    builds.close()
    assert process.returncode == -signal.SIGTERM and builds.running is None
