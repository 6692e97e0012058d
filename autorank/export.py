"""Pick a point of a finished study's front and write its plan, reading the study from storage.

    python -m autorank.export --storage sqlite:///outputs/optuna.db --study NAME --max-mb 300 --out plan.yaml
    python -m autorank.export --storage URL --study NAME --max-flops 2e9 --out plan.yaml
    python -m autorank.export --storage URL --study NAME --trial 17 --out plan.yaml
    python -m autorank.export --storage URL --study NAME --list        # print the front

The front is the study's own (`study.best_trials`, read by autorank.search.records). Among the
front points under the cap, the best is taken: highest accuracy; ties: less memory, then fewer
FLOPs; where the study refit plans, the best refit accuracy within the cap (on the front or not).
`--trial N` takes trial N if it is feasible (on the front or not). Plans are the trials' records
written by autorank.search.trial, written by autorank.search.planfile.export_record (the study's
own writer: the same plan file as the study's for the same trial, a refit trial's with the refit's
step count and accuracy), stamped with the fingerprint of the model their fine-tuning settings
name. `--list` prints each trial's accuracy and, where it was refit, the refit accuracy beside it.

Nothing is written before the storage is known: `--out` is refused when it names the study's
storage file (by any path, link or hard link), a SQLite storage is opened read-only first and
refused when it is not an Optuna database (another program's, random bytes, empty), and a study
that is not autorank's or holds a damaged record is one error line, exit status 2.

Exit status (each error is one line on stderr):
  0  the plan file was written (or --list printed the front)
  1  no plan fits: no front point under the cap (the line names the front's smallest peak and
     fewest FLOPs), or --trial names a trial that is not a feasible trained plan
  2  bad input: the storage cannot be read or holds no autorank study, a stored record is
     damaged, or --out cannot be written
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from autorank.errors import ConfigError
from autorank.redact import guard_console, redact_text, redact_url
from autorank.search.planfile import export_record
from autorank.search.records import (DIRECTIONS, RECORD_ATTR, TrialRecord, best_of, best_refit, front_of,
                                     records_from_study)
from autorank.units import MB


class NoPlanFound(ValueError):
    pass


def select(records: list[TrialRecord], *, max_mb: float | None = None, max_flops: float | None = None,
           trial: int | None = None) -> TrialRecord:
    """The chosen trial (see module doc); NoPlanFound with the front's range when none fits."""
    if trial is not None:
        hit = [r for r in records if r.number == trial]
        if not hit:
            raise NoPlanFound(f"trial {trial} is not in the study ({len(records)} trials)")
        if not hit[0].feasible or hit[0].plan is None:
            raise NoPlanFound(f"trial {trial} is {hit[0].state}, not a feasible trained plan"
                              + (f" ({hit[0].fail_reason})" if hit[0].fail_reason else ""))
        return hit[0]
    front = front_of(records)
    if not front:
        raise NoPlanFound("the study has no feasible complete trial: nothing to export")

    def fits(r: TrialRecord) -> bool:
        return ((max_mb is None or r.predicted_peak_bytes <= max_mb * MB)
                and (max_flops is None or r.flops <= max_flops))

    # Refit (full-fidelity) accuracy ranks before the proxy, as in the study's own export: the
    # refit plans include the best plain-only plan, which need not be on the proxy front.
    refit = best_refit([r for r in records if fits(r)])
    if refit is not None:
        return refit
    ok = [r for r in front if fits(r)]
    if not ok:
        lo_mb = min(r.peak_mb for r in front)
        lo_fl = min(r.flops for r in front)
        caps = " and ".join(c for c in (f"peak <= {max_mb} MB" if max_mb is not None else "",
                                        f"FLOPs <= {max_flops:g}" if max_flops is not None else "") if c)
        raise NoPlanFound(f"no plan fits: no front point satisfies {caps}: the front's smallest peak is "
                          f"{lo_mb:.2f} MB and its fewest FLOPs {lo_fl:g} per step "
                          f"({len(front)} front points)")
    return best_of(ok)


class StorageError(ValueError):
    """The study could not be read from its storage (bad URL, unreachable, missing, not a study).
    Its message never holds the URL's password (redacted here, the one place)."""

    def __init__(self, message: str):
        super().__init__(redact_text(message))


def _sqlite_path(storage: str) -> Path | None:
    """The database file of a sqlite URL (None for another backend or an in-memory db)."""
    from autorank.io import sqlite_path

    path = sqlite_path(storage)
    return None if path is None else path.expanduser()


def _check_sqlite(storage: str) -> None:
    """A SQLite storage is looked at read-only first: a missing file is refused (sqlite would
    create an empty database there), and so is a file that is not an Optuna database (Optuna
    would create its tables in it before saying that the study is not there)."""
    from autorank.search.storage import check_optuna_sqlite

    path = _sqlite_path(storage)
    if storage.startswith("sqlite:") and path is None:
        raise StorageError(f"storage {storage!r} names no database file: use sqlite:///path/to/optuna.db")
    if path is None:
        return
    if not path.is_file():
        raise StorageError(f"no sqlite database at {path} (from {storage!r}): check the path; the run "
                           "folder's optuna.db is the default (sqlite:/// + a relative path, sqlite:////"
                           " + an absolute one)")
    try:
        if not check_optuna_sqlite(path, "--storage"):
            raise ConfigError(f"--storage: {path} holds no Optuna study (an empty database): pass the "
                              "database the study was run with")
    except ConfigError as e:
        raise StorageError(str(e)) from e


def read_records(storage: str, study_name: str) -> list[TrialRecord]:
    """All trials of the study, read once from its storage. StorageError with what to do when
    the storage cannot be read, is not an Optuna database (see _check_sqlite), the study is not
    autorank's, or a stored record is damaged (check_records)."""
    _check_sqlite(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError as e:
        try:
            names = ", ".join(repr(n) for n in optuna.get_all_study_names(storage)) or "none"
        except Exception:
            names = "unknown"
        raise StorageError(f"study {study_name!r} not found in {storage} (studies there: {names}): "
                           "pass one of them to --study") from e
    except Exception as e:  # sqlalchemy ArgumentError/OperationalError/DatabaseError, missing driver
        raise StorageError(f"cannot read the study from storage {storage!r}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}; check the URL (e.g. "
                           "sqlite:///outputs/optuna.db) and that the database is reachable") from e
    trials = study.get_trials(deepcopy=False)
    if len(study.directions) != len(DIRECTIONS) or (
            any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
            and not any(isinstance(t.user_attrs.get(RECORD_ATTR), dict) for t in trials)):
        raise StorageError(f"study {study_name!r} in {storage} is not an autorank study ({len(study.directions)} "
                           "objective(s), no trial holds an autorank record): export studies run by "
                           "python -m autorank")
    try:
        records = records_from_study(study)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise StorageError(f"study {study_name!r} in {storage} holds a damaged record ({type(e).__name__}: "
                           f"{e}): it was changed outside autorank; run the study again") from e
    check_records(records, study_name)
    return records


# The fields export reads from a feasible record, and the types they must have.
_NUMBER = (int, float)
_RECORD_TYPES = {"val_accuracy": _NUMBER, "predicted_peak_bytes": _NUMBER, "flops": _NUMBER,
                 "plan": dict, "choices": dict, "refit_accuracy": (*_NUMBER, type(None))}


def check_records(records: list[TrialRecord], study_name: str) -> None:
    """StorageError naming the first feasible trial whose stored record has a field of the wrong
    type (a study edited by hand or by another tool): such a record would end in a traceback, or
    in a plan built from it."""
    for r in records:
        if not r.feasible:
            continue
        for name, types in _RECORD_TYPES.items():
            value = getattr(r, name)
            if not isinstance(value, types) or isinstance(value, bool):
                raise StorageError(f"study {study_name!r}: trial {r.number}'s stored record is damaged ({name} "
                                   f"is {value!r:.60}, not {_type_names(types)}): it was changed outside "
                                   "autorank; export another trial with --trial N, or run the study again")


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({"int": "a number", "float": "a number", "dict": "a mapping",
                        "NoneType": "null"}[t.__name__] for t in types if t is not float)


def export(storage: str, study_name: str, out: str | Path, *, max_mb: float | None = None,
           max_flops: float | None = None, trial: int | None = None,
           records: list[TrialRecord] | None = None) -> tuple[TrialRecord, Path]:
    """Select (see `select`) and write the trial's plan file with export_record, the study's own
    writer (the same file as the study's for the same trial: a refit trial's file carries the
    refit's step count and accuracy). `records`: the study's trials
    already read from storage (read_records); None reads them here."""
    if records is None:
        records = read_records(storage, study_name)
    rec = select(records, max_mb=max_mb, max_flops=max_flops, trial=trial)
    try:
        return rec, export_record(rec, out, meta={
            "exported_from": {"storage": redact_url(storage), "study": study_name, "trial": rec.number}})
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:  # OSError: the caller's
        raise StorageError(f"study {study_name!r}: trial {rec.number}'s stored plan is damaged "
                           f"({type(e).__name__}: {e}): it was changed outside autorank; export another "
                           "trial with --trial N, or run the study again") from e


def _accuracy(r: TrialRecord) -> str:
    """The trial's accuracy, and the refit's beside it where the trial was refit."""
    refit = "" if r.refit_accuracy is None else f", refit {r.refit_accuracy:.4f} ({r.refit_steps} steps)"
    return f"accuracy {r.val_accuracy:.4f} (trial{'' if r.steps is None else f', {r.steps} steps'}){refit}"


def print_front(records: list[TrialRecord]) -> None:
    """`--list`: the front by peak, then the refit trials off the front (the export may pick one),
    each with its trial accuracy and, where refit, the refit accuracy."""
    front = sorted(front_of(records), key=lambda r: r.predicted_peak_bytes)
    off = sorted((r for r in records if r.feasible and not r.on_front and r.refit_accuracy is not None),
                 key=lambda r: r.predicted_peak_bytes)
    for r in front + off:
        print(f"trial {r.number:4d}  {_accuracy(r)}  peak {r.peak_mb:9.2f} MB  "
              f"{r.flops / 1e9:8.3f} GFLOPs/step{'' if r.on_front else '  (off the front, refit)'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autorank.export", description=__doc__.split("\n")[0])
    ap.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///path/optuna.db")
    ap.add_argument("--study", required=True, help="study name")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--max-mb", type=float, help="cap on predicted peak training memory (MiB)")
    g.add_argument("--max-flops", type=float, help="cap on training FLOPs per step")
    g.add_argument("--trial", type=int, help="a trial number")
    g.add_argument("--list", action="store_true", help="print the front and exit")
    ap.add_argument("--out", default="plan.yaml", help="plan file to write (.yaml or .json)")
    a = ap.parse_args(argv)
    if not a.list:
        from autorank.validate import check_writable

        try:  # before the study is read: a path we cannot write is known at once
            check_writable(a.out, "--out", {"the study's storage (--storage)": _sqlite_path(a.storage)})
        except ConfigError as e:
            print(f"error: {str(e).replace('--out=', '--out ')}", file=sys.stderr)
            return 2
    try:
        records = read_records(a.storage, a.study)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.list:
        print_front(records)
        return 0
    try:
        rec, path = export(a.storage, a.study, a.out, max_mb=a.max_mb, max_flops=a.max_flops,
                           trial=a.trial, records=records)
    except NoPlanFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {a.out}: {e}", file=sys.stderr)
        return 2
    print(f"trial {rec.number}: {_accuracy(rec)}, predicted peak {rec.peak_mb:.2f} MB, "
          f"{rec.flops / 1e9:.3f} GFLOPs/step -> {path}")
    return 0


if __name__ == "__main__":
    guard_console()  # no storage password reaches the console, whatever prints it
    sys.exit(main())
