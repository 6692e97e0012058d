"""Pick a point of a finished study's front and write its plan, reading the study from storage.

    python -m autorank.export --storage sqlite:///outputs/optuna.db --study NAME --max-mb 300 --out plan.yaml
    python -m autorank.export --storage URL --study NAME --max-flops 2e9 --out plan.yaml
    python -m autorank.export --storage URL --study NAME --trial 17 --out plan.yaml
    python -m autorank.export --storage URL --study NAME --list        # print the front

Among the front points under the cap, the best is taken: highest accuracy; ties: less memory,
then fewer FLOPs. `--trial N` takes trial N if it is feasible (on the front or not). Plans are the
trials' `plan` user attrs written by autorank.search.study.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autorank.search.study import MB, TrialRecord, best_of, pareto_front, records_from_storage


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
    front = pareto_front(records)
    if not front:
        raise NoPlanFound("the study has no feasible complete trial: nothing to export")
    ok = [r for r in front
          if (max_mb is None or r.predicted_peak_bytes <= max_mb * MB)
          and (max_flops is None or r.flops <= max_flops)]
    if not ok:
        lo_mb = min(r.peak_mb for r in front)
        lo_fl = min(r.flops for r in front)
        caps = " and ".join(c for c in (f"peak <= {max_mb} MB" if max_mb is not None else "",
                                        f"FLOPs <= {max_flops:g}" if max_flops is not None else "") if c)
        raise NoPlanFound(f"no front point satisfies {caps}: the front's smallest peak is "
                          f"{lo_mb:.2f} MB and its fewest FLOPs {lo_fl:g} per step "
                          f"({len(front)} front points)")
    return best_of(ok)


class StorageError(ValueError):
    """The study could not be read from its storage (bad URL, unreachable, missing, not a study)."""


def _sqlite_path(storage: str) -> Path | None:
    """The database file of a sqlite URL (None for another backend or an in-memory db)."""
    if not storage.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # optuna's own dependency

    try:
        db = make_url(storage).database
    except Exception as e:
        raise StorageError(f"cannot parse storage URL {storage!r}: {e}; expected e.g. "
                           "sqlite:///outputs/optuna.db") from e
    return Path(db) if db and db != ":memory:" else None


def read_records(storage: str, study_name: str) -> list[TrialRecord]:
    """All trials of the study, read once from its storage. StorageError with what to do when
    the storage cannot be read; a sqlite file that does not exist is refused (sqlite would create
    an empty database there and the study would merely be 'not found')."""
    path = _sqlite_path(storage)
    if storage.startswith("sqlite:") and path is None:
        raise StorageError(f"storage {storage!r} names no database file: use sqlite:///path/to/optuna.db")
    if path is not None and not path.is_file():
        raise StorageError(f"no sqlite database at {path} (from {storage!r}): check the path; the run "
                           "folder's optuna.db is the default (sqlite:/// + a relative path, sqlite:////"
                           " + an absolute one)")
    try:
        return records_from_storage(storage, study_name)
    except KeyError as e:
        try:
            import optuna

            names = ", ".join(repr(n) for n in optuna.get_all_study_names(storage)) or "none"
        except Exception:
            names = "unknown"
        raise StorageError(f"study {study_name!r} not found in {storage} (studies there: {names}): "
                           "pass one of them to --study") from e
    except Exception as e:  # sqlalchemy ArgumentError/OperationalError/DatabaseError, missing driver
        raise StorageError(f"cannot read the study from storage {storage!r}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}; check the URL (e.g. "
                           "sqlite:///outputs/optuna.db) and that the database is reachable") from e


def model_fingerprint_from_meta(meta: dict) -> dict | None:
    """Fingerprint of the model the plan's meta.model names, if it is one of autorank's
    torch-only factories (autorank.workload.models). The module file is loaded on its own
    (autorank.plan.build_model_from_factory) rather than imported as autorank.workload.models:
    importing the package autorank.workload would pull in Lightning, seconds of import for one
    fingerprint; and only the trusted factory module is ever loaded, since the name comes from the
    study's storage. None when there is no such factory or it cannot be built."""
    from autorank.plan import build_model_from_factory, model_fingerprint

    spec = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(spec, dict) or not spec.get("factory"):
        return None
    try:
        model = build_model_from_factory(str(spec["factory"]), dict(spec.get("kwargs") or {}), trusted_only=True)
    except Exception as e:
        print(f"warning: plan meta names model {spec['factory']!r} which cannot be built here ({e}); "
              "the plan keeps its own fingerprint, if any", file=sys.stderr)
        return None
    return model_fingerprint(model)


def export(storage: str, study_name: str, out: str | Path, *, max_mb: float | None = None,
           max_flops: float | None = None, trial: int | None = None,
           records: list[TrialRecord] | None = None) -> tuple[TrialRecord, Path]:
    """Select (see `select`) and write the plan. `records`: the study's trials already read from
    storage (read_records); None reads them here. The plan is stamped with the fingerprint of the
    model its meta names when that can be built with torch alone, else keeps its own."""
    from autorank.plan import Plan

    if records is None:
        records = read_records(storage, study_name)
    rec = select(records, max_mb=max_mb, max_flops=max_flops, trial=trial)
    plan = Plan.from_dict(rec.plan)
    fp = model_fingerprint_from_meta(plan.meta)
    if fp is not None:
        if plan.fingerprint is not None and plan.fingerprint.get("sha256") != fp["sha256"]:
            print(f"warning: trial {rec.number}'s plan carries a fingerprint of another model than "
                  "its meta.model builds; the exported plan takes the meta.model's", file=sys.stderr)
        plan.fingerprint = fp
    plan.meta.update({"exported_from": {"storage": storage, "study": study_name, "trial": rec.number},
                      "val_accuracy": rec.val_accuracy})
    return rec, plan.save(out)


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
    try:
        records = read_records(a.storage, a.study)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.list:
        for r in sorted(pareto_front(records), key=lambda r: r.predicted_peak_bytes):
            print(f"trial {r.number:4d}  acc {r.val_accuracy:.4f}  peak {r.peak_mb:9.2f} MB  "
                  f"{r.flops / 1e9:8.3f} GFLOPs/step")
        return 0
    try:
        rec, path = export(a.storage, a.study, a.out, max_mb=a.max_mb, max_flops=a.max_flops,
                           trial=a.trial, records=records)
    except NoPlanFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {a.out}: {e}", file=sys.stderr)
        return 2
    print(f"trial {rec.number}: accuracy {rec.val_accuracy:.4f}, predicted peak {rec.peak_mb:.2f} MB, "
          f"{rec.flops / 1e9:.3f} GFLOPs/step -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
