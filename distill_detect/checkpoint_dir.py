"""The rules of a resumable output directory that a long job (a fine-tune) writes a checkpoint into.

- **One writer**: ``lock()`` takes an exclusive ``flock`` on a lock file inside the directory (released by the
  OS if the process dies); a second writer is refused, not queued.
- **Only our own directories**: a directory that exists, is not empty and holds neither a marker nor a run
  file is someone else's, and is refused (even with ``overwrite``); so are a file and an unwritable path.
- **The marker is written last**: ``publish`` moves each finished file from a staging folder into the
  directory by an atomic rename, then writes the marker (atomic JSON). A marker means the job completed.
- **Same settings or nothing**: ``claim(run)`` compares the run's key (a hash of everything that changes
  the result) with the marker's or with the interrupted run's (``CHECKPOINTS/RUN_FILE``). A completed run with
  the same key is returned as is; an interrupted one is resumed; other settings are refused with the
  differences named, unless ``overwrite``, which empties the directory first.
- **Half-saved checkpoints are dropped**: a ``checkpoint-N`` counts once its ``trainer_state.json`` (written
  last by the Hugging Face Trainer) exists; the others, and staging folders of a cut-short final save, are
  removed when the directory is claimed.
- **No pickle**: ``no_pickle_callback`` deletes the Trainer's training_args.bin as each checkpoint is saved.

``marker_head``/``marker_tail`` give the marker's bookkeeping entries (format, package, run key and run;
wall time, library versions, date); the job puts its own record between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from distill_detect.errors import ConfigError

COMPLETE_FILE = "trainer_state.json"  # what makes a checkpoint-N complete


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (e.g. cut short)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON next to ``path``, fsync it, rename it onto ``path``: never a half-written file."""
    path = Path(path)
    with open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(fh.name, path)


def remove(p: Path) -> None:
    """Remove a file, a symlink or a whole directory."""
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def package_versions(names) -> dict:
    """{name: installed version, or None} for each distribution name."""
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {n: version(n) for n in names}


def run_key(run: dict) -> str:
    """A short hash of a JSON-able description of a run (what must match for a resume)."""
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:24]


def _step(p: Path) -> int:
    head, _, n = p.name.partition("-")
    return int(n) if head == "checkpoint" and n.isdigit() and p.is_dir() else -1


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose save finished (the Trainer writes ``trainer_state.json`` last), else None."""
    done = [p for p in Path(ckpt_dir).glob("checkpoint-*") if _step(p) >= 0 and (p / COMPLETE_FILE).exists()]
    return max(done, key=_step) if done else None


def rows_hash(rows) -> str:
    """A short sha256 over JSON rows in their order (e.g. the training examples: their order is the data order)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()[:24]


def no_pickle_callback():
    """A Hugging Face ``TrainerCallback`` that deletes each checkpoint's training_args.bin (a pickle) once saved:
    the directory holds no pickle (the Trainer's own state is ``torch.load``-ed with ``weights_only=True``)."""
    import transformers

    class NoPickleArgs(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)

    return NoPickleArgs()


def run_differences(old: dict, new: dict) -> str:
    """What differs between two run descriptions of the usual shape: ``config`` (the settings, compared key by
    key), ``data_hash`` and ``n_examples`` (the training data), ``base_model`` (what training starts from)."""
    a, b = old.get("config", {}), new.get("config", {})
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("data_hash") != new.get("data_hash"):
        n, h = "n_examples", "data_hash"
        diffs.append(f"training data: {old.get(n)} examples (hash {old.get(h)}) -> {new.get(n)} (hash {new.get(h)})")
    if old.get("base_model") != new.get("base_model"):
        diffs.append(f"base model: {old.get('base_model')} -> {new.get('base_model')}")
    return "; ".join(diffs) or "unknown"


class CheckpointDir:
    """An output directory with a lock, a marker written last, resumable checkpoints and a run identity.

    ``path``: the directory. ``marker``: the file whose presence means the job completed (JSON with a
    ``run_key``). ``checkpoints``: the subfolder the trainer saves ``checkpoint-N`` folders into, holding
    ``run_file`` (the interrupted run's description). ``what``: the job's name in messages; ``flag``: the option
    that chose the directory. ``describe(old_run, new_run)``: the differences named when other settings are
    refused. ``log``: where notices go (None: nowhere). ``claim`` sets ``run`` and ``key``; the clock of
    ``marker_tail``'s wall time starts at construction.
    """

    def __init__(self, path, *, marker: str, checkpoints: str = "checkpoints", run_file: str = "run.json",
                 lock_file: str = ".lock", staging_prefix: str = ".final-", what: str = "job", flag: str = "--out",
                 describe: Callable[[dict, dict], str] = run_differences, log: Callable[[str], None] | None = None):  # fmt: skip
        self.path, self.marker, self.checkpoints = Path(path).expanduser(), marker, Path(path).expanduser() / checkpoints
        self.run_file, self.lock_file, self.staging_prefix = run_file, lock_file, staging_prefix
        self.what, self.flag, self.describe, self.log = what, flag, describe, log or (lambda msg: None)
        self.run, self.key, self.t_start = None, None, time.time()

    def _ours(self) -> bool:
        return (self.path / self.marker).exists() or (self.checkpoints / self.run_file).exists()

    @contextmanager
    def lock(self):
        """Check the directory can be ours, create it, and hold its lock inside the block (one writer at a time)."""
        import fcntl

        out, where = self.path, f"{self.flag} {str(self.path)!r}"
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{where} is a file; give a directory for the {self.what}'s output")
        keep = (self.checkpoints.name, self.lock_file)
        if out.exists() and not self._ours() and any(p.name not in keep and not p.name.startswith(self.staging_prefix) for p in out.iterdir()):  # fmt: skip
            raise ConfigError(f"{where} exists and does not hold a distill-detect {self.what}; choose a new or empty directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output directory {str(out)!r} ({exc.strerror}); choose a writable {self.flag}") from None  # fmt: skip
        if not os.access(out, os.W_OK):
            raise ConfigError(f"the output directory {str(out)!r} is not writable; choose a writable {self.flag}")
        with open(out / self.lock_file, "a") as fh:  # released by the OS if the process dies
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another {self.what} is writing to {out}; wait for it to finish or choose another {self.flag}") from None  # fmt: skip
            yield self

    def claim(self, run: dict, *, overwrite: bool = False) -> dict | None:
        """Under the lock: the marker of a completed ``run`` (a JSON-able description of everything that changes the
        result; nothing to do), else None, with the directory ready to run or resume. Refuses a run described
        otherwise (naming the differences); ``overwrite`` empties the directory first."""
        self.run, self.key = run, (key := run_key(run))
        out, done, old = self.path, read_json(self.path / self.marker), read_json(self.checkpoints / self.run_file)
        if done is not None and not overwrite:
            if done.get("run_key") != key:
                raise ConfigError(f"{out} holds a completed {self.what} with different settings ({self.describe(done.get('run', {}), run)}); "
                                  f"choose another {self.flag}, or pass --overwrite to replace it")  # fmt: skip
            return done
        if overwrite and any(p.name != self.lock_file for p in out.iterdir()):
            self.log(f"--overwrite: removing the previous {self.what} in {out}")
            for p in (p for p in out.iterdir() if p.name != self.lock_file):
                remove(p)
            old = None
        if old is not None and old.get("run_key") != key:
            raise ConfigError(f"{out} holds an interrupted {self.what} with different settings ({self.describe(old, run)}); re-run "
                              f"with the original settings to resume it, choose another {self.flag}, or pass --overwrite to start over")  # fmt: skip
        self.checkpoints.mkdir(exist_ok=True)
        for p in [*out.glob(self.staging_prefix + "*"), *self.checkpoints.glob("checkpoint-*")]:
            if p.parent == out or not (p / COMPLETE_FILE).exists():  # a final save or a checkpoint cut short
                shutil.rmtree(p, ignore_errors=True)
        if old is None:
            write_json_atomic(self.checkpoints / self.run_file, {**run, "run_key": key})
        return None

    def resume_point(self) -> tuple[Path | None, dict]:
        """The checkpoint to resume from (None: start afresh) and its ``trainer_state.json`` ({} if none); logged."""
        if (last := last_complete_checkpoint(self.checkpoints)) is None:
            return None, {}
        state = read_json(last / COMPLETE_FILE) or {}
        self.log(f"Resuming from {last.name} (step {state.get('global_step')} of {state.get('max_steps')})")
        return last, state

    def interrupted_message(self) -> str:
        """What to tell the user when the job is interrupted: how far it got and how to resume."""
        last = last_complete_checkpoint(self.checkpoints)
        where = f"the last complete checkpoint is {last.name}" if last else "no checkpoint was completed yet"
        return f"interrupted; {where}. Run the same command again to resume"

    def marker_head(self) -> dict:
        """The first entries of the marker: its format, the package that wrote it and the claimed run."""
        from distill_detect import __version__

        return {"format": 1, "package": {"name": "distill-detect", "version": __version__}, "run_key": self.key, "run": self.run}

    def marker_tail(self, libraries=()) -> dict:
        """The last entries of the marker: wall time since construction, library versions, when it was written."""
        return {"wall_time_s": time.time() - self.t_start, "versions": package_versions(libraries),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip

    def staging(self) -> Path:
        """A new folder inside the directory to save the final files into before ``publish``."""
        return Path(tempfile.mkdtemp(prefix=self.staging_prefix, dir=self.path))

    def publish(self, staging: Path, marker: dict) -> None:
        """Move each file of ``staging`` into the directory by an atomic rename, then write the marker."""
        for p in sorted(staging.iterdir()):
            if (self.path / p.name).exists():
                remove(self.path / p.name)
            os.replace(p, self.path / p.name)
        staging.rmdir()
        write_json_atomic(self.path / self.marker, marker)

    def drop_checkpoints(self) -> None:
        """Remove the checkpoints folder (optimizer state and all)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
