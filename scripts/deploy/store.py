"""The feedback store: recorded answers, labels, and the running tally of labelled accuracy.

SQLAlchemy Core over SQLite (the default: one file under the run folder, WAL, ``synchronous=FULL``) or
PostgreSQL (a DSN, for several replicas or hosts); the schema is created and upgraded by Alembic
(``scripts/deploy/migrations``) when the recorder starts. Only the recorder (scripts/deploy/recorder.py)
opens it: the handler spools, the gateway and ``ctl`` go through the recorder's API.

Tables (``schema()`` below; the migration creates exactly these, ``tests/unit/test_feedback_store.py`` checks):

- ``models``: model, version -> class names (from each spool segment's first line);
- ``predictions``: one row per answered image and version, keyed by (model, request id, image index,
  version): two versions answering the same request (a shadow or canary rollout) are two rows side by side;
  the flags, the canonical input (zlib-compressed uint8), the upload when kept;
- ``feedback``: one label per (model, request id, image index): the first label given stands;
- ``disputes``: later labels that disagreed with it (refused with 409, kept as a sign of an ambiguous image);
- ``tally``: labelled and correct answers per (model, version, flag, label given), only ever incremented,
  in the same transaction as the label (or as an answer that arrives after its label): the summary and
  the Prometheus counters read it, so they agree with each other exactly and survive restarts and retention;
- ``spool_offsets``: how far each spool segment has been ingested, committed with the rows it produced
  (a recorder killed mid-ingest re-reads from there; rows already in are skipped by their key).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    case,
    create_engine,
    event,
    exists,
    false,
    func,
    select,
    tuple_,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from handler.record import FLAGS, NOT_A_GARMENT, flag
from scripts.ops.feedback import wilson

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MAX_ITEMS = 1000  # labels in one POST
ROW_OVERHEAD = 200  # bytes a prediction row takes besides its input and upload (size retention's estimate)
CHUNK = 400  # keys per IN (...) clause


def schema(metadata: MetaData | None = None) -> MetaData:
    """The tables, as the latest migration leaves them."""
    md = metadata or MetaData()
    ident = BigInteger().with_variant(Integer, "sqlite")  # SQLite's rowid alias must be INTEGER
    Table("models", md,
          Column("model", String(128), nullable=False), Column("version", String(64), nullable=False),
          Column("classes", Text, nullable=False), Column("first_seen", Float, nullable=False),
          PrimaryKeyConstraint("model", "version", name="pk_models"))
    Table("predictions", md,
          Column("id", ident, primary_key=True, autoincrement=True),
          Column("model", String(128), nullable=False), Column("version", String(64), nullable=False),
          Column("request_id", String(128), nullable=False), Column("item", Integer, nullable=False),
          Column("time", Float, nullable=False),
          Column("label", String(256), nullable=False), Column("class_index", Integer, nullable=False),
          Column("confidence", Float, nullable=False), Column("uncertain", Boolean, nullable=False),
          Column("ood", Boolean, nullable=False), Column("ood_score", Float, nullable=True),
          Column("tta_views", Integer, nullable=False), Column("flag", String(32), nullable=False),
          Column("review", Boolean, nullable=False),
          Column("input_shape", String(32), nullable=False), Column("input", LargeBinary, nullable=False),
          Column("upload", LargeBinary, nullable=True),
          Column("tallied", Boolean, nullable=False, server_default=false()),
          UniqueConstraint("model", "request_id", "item", "version", name="uq_predictions_answer"),
          Index("ix_predictions_time", "time"),
          Index("ix_predictions_review", "model", "review", "time"))
    Table("feedback", md,
          Column("id", ident, primary_key=True, autoincrement=True),
          Column("model", String(128), nullable=False), Column("request_id", String(128), nullable=False),
          Column("item", Integer, nullable=False), Column("label", String(256), nullable=False),
          Column("class_index", Integer, nullable=True), Column("time", Float, nullable=False),
          UniqueConstraint("model", "request_id", "item", name="uq_feedback_answer"))
    Table("disputes", md,
          Column("id", ident, primary_key=True, autoincrement=True),
          Column("model", String(128), nullable=False), Column("request_id", String(128), nullable=False),
          Column("item", Integer, nullable=False), Column("label", String(256), nullable=False),
          Column("standing", String(256), nullable=False), Column("time", Float, nullable=False),
          Index("ix_disputes_answer", "model", "request_id", "item"))
    Table("tally", md,
          Column("model", String(128), nullable=False), Column("version", String(64), nullable=False),
          Column("flag", String(32), nullable=False), Column("label", String(256), nullable=False),
          Column("labelled", BigInteger, nullable=False), Column("correct", BigInteger, nullable=False),
          PrimaryKeyConstraint("model", "version", "flag", "label", name="pk_tally"))
    Table("spool_offsets", md,
          Column("segment", String(512), primary_key=True), Column("offset", BigInteger, nullable=False),
          Column("time", Float, nullable=False))
    return md


METADATA = schema()
MODELS, PREDICTIONS, FEEDBACK, DISPUTES, TALLY, OFFSETS = (METADATA.tables[n] for n in (
    "models", "predictions", "feedback", "disputes", "tally", "spool_offsets"))


# --- errors: each a status and a message that says what to do ----------------------------------------------------
class FeedbackError(Exception):
    status = 400
    kind = "BadRequest"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message, self.details = message, details

    def to_body(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": self.message, **self.details}


class MalformedFeedback(FeedbackError):
    kind = "MalformedFeedback"


class UnknownLabel(FeedbackError):
    kind = "UnknownLabel"


class TooManyLabels(FeedbackError):
    status, kind = 413, "TooManyLabels"


class UnknownModel(FeedbackError):
    status, kind = 404, "UnknownModel"


class UnknownRequest(FeedbackError):
    status, kind = 404, "UnknownRequest"


class LabelConflict(FeedbackError):
    status, kind = 409, "LabelConflict"


class StoreUnavailable(FeedbackError):
    status, kind = 503, "StoreUnavailable"


# --- labels -------------------------------------------------------------------------------------------------------
def parse_label(value, classes: tuple[str, ...], where: str = "") -> tuple[str, int | None]:
    """A class name (any case), a class index, or "not a garment" -> (the label as stored, its class index or None)."""
    k = len(classes)
    if isinstance(value, bool):
        value = None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value < k:
        return classes[value], value
    if isinstance(value, str):
        text = " ".join(value.split()).lower()
        if text == NOT_A_GARMENT:
            return NOT_A_GARMENT, None
        by_name = {name.lower(): i for i, name in enumerate(classes)}
        if text in by_name:
            return classes[by_name[text]], by_name[text]
    shown = json.dumps(value)[:40] if value is not None else "nothing"
    raise UnknownLabel(f"{where}\"label\" must be a class name ({', '.join(json.dumps(c) for c in classes)}), a class "
                       f"index from 0 to {k - 1}, or \"{NOT_A_GARMENT}\"; got {shown}.", classes=list(classes))


@dataclass(frozen=True)
class Label:
    request_id: str
    item: int
    value: object  # as sent


def parse_body(doc) -> list[Label]:
    """``{"request_id", "label"[, "index"]}`` or a list of them (or ``{"labels": [...]}``) -> Labels; 400/413 otherwise."""
    hint = ('Send {"request_id": "<X-Request-ID of the answer>", "label": "<class name>" | <class index> | '
            f'"{NOT_A_GARMENT}"}} (with "index": i for image i of an "instances" request), or a list of them.')
    items = doc.get("labels") if isinstance(doc, dict) and "labels" in doc else doc
    single = isinstance(items, dict)
    items = [items] if single else items
    if not isinstance(items, list) or not items:
        raise MalformedFeedback(f"The body must be a JSON object or a non-empty list of objects. {hint}")
    if len(items) > MAX_ITEMS:
        raise TooManyLabels(f"{len(items)} labels in one request; send at most {MAX_ITEMS} at a time.")
    out = []
    for i, obj in enumerate(items):
        where = "" if single else f"[{i}]: "
        if not isinstance(obj, dict):
            raise MalformedFeedback(f"{where}each label must be an object; got {type(obj).__name__}. {hint}")
        rid, item = obj.get("request_id"), obj.get("index", 0)
        if not isinstance(rid, str) or not rid.strip() or len(rid) > 128:
            raise MalformedFeedback(f'{where}"request_id" must be the answer\'s X-Request-ID (a string of 1 to 128 '
                                    f"characters). {hint}")
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 10_000:
            raise MalformedFeedback(f'{where}"index" must be the image\'s position in the request (0 for a single '
                                    f"image); got {json.dumps(item)[:40]}.")
        if "label" not in obj:
            raise MalformedFeedback(f'{where}"label" is missing. {hint}')
        out.append(Label(rid, item, obj["label"]))
    return out


# --- statistics the summary shows ---------------------------------------------------------------------------------
def figures(labelled: int, correct: int) -> dict:
    return {"labelled": labelled, "correct": correct,
            "accuracy": round(correct / labelled, 6) if labelled else None, "interval": wilson(correct, labelled)}


# --- the store ------------------------------------------------------------------------------------------------------
def engine_url(store: str) -> str:
    """A DSN (postgresql://..., sqlite:///...) or a file path (SQLite) -> SQLAlchemy's URL, with psycopg 3 for PostgreSQL."""
    if "://" not in store:
        return f"sqlite:///{Path(store).resolve()}"
    scheme, rest = store.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return store


def redact(store: str) -> str:
    """A DSN without its password, for logs and messages."""
    if "://" not in store or "@" not in store.split("://", 1)[1].split("/", 1)[0]:
        return store
    scheme, rest = store.split("://", 1)
    auth, host = rest.split("@", 1)
    return f"{scheme}://{auth.split(':', 1)[0]}:***@{host}" if ":" in auth else store


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only: deleted pages are given back
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns: an acknowledged label survives a crash
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(store: str) -> Engine:
    url = engine_url(store)
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4, connect_args={"connect_timeout": 5})


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the latest migration (Alembic, scripts/deploy/migrations)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _insert(conn: Connection, table: Table):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def _chunks(items: list, size: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Store:
    def __init__(self, store: str, migrate_schema: bool = True):
        self.store = store
        self.engine = make_engine(store)
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.write_lock = threading.Lock()  # one writer at a time in this process (SQLite has one anyway)
        self.skipped = 0  # spool lines that were not answers of this format
        if migrate_schema:
            migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _write(self):
        """A write transaction; the store being down is StoreUnavailable (503) for the API."""
        store = self

        class Tx:
            def __enter__(self):
                store.write_lock.acquire()
                try:
                    self.ctx = store.engine.begin()
                    return self.ctx.__enter__()
                except OperationalError as exc:
                    store.write_lock.release()
                    raise StoreUnavailable(f"The feedback store does not answer ({type(exc.orig).__name__}); "
                                           "retry in a few seconds.") from None

            def __exit__(self, *exc):
                try:
                    return self.ctx.__exit__(*exc)
                finally:
                    store.write_lock.release()

        return Tx()

    # --- ingestion -------------------------------------------------------------------------------------
    def offset(self, segment: str) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(select(OFFSETS.c.offset).where(OFFSETS.c.segment == segment)).scalar()
        return int(value or 0)

    def ingest(self, segment: str, offset: int, lines: list[dict]) -> int:
        """The spool lines of ``segment`` up to ``offset`` (bytes), in one transaction with the new offset.
        Returns the answers added (an answer already in, by its key, is skipped)."""
        now = time.time()
        with self._write() as conn:
            added = 0
            for line in lines:
                if line.get("type") == "model":
                    conn.execute(_insert(conn, MODELS).values(
                        model=line["model"], version=line["version"], classes=json.dumps(line["classes"]),
                        first_seen=line.get("time", now)).on_conflict_do_nothing())
            rows = []
            for line in lines:
                if line.get("type") == "answer":
                    try:
                        rows.append(self._row(line))
                    except (KeyError, TypeError, ValueError):  # not an answer line of this format: skipped, counted
                        self.skipped += 1
            # executemany with RETURNING (SQLAlchemy's "insertmanyvalues"): one cached statement, batched by the
            # driver; a multi-row VALUES built per chunk cost 70 % of the recorder's CPU in compiling it.
            for chunk in _chunks(rows):
                result = conn.execute(_insert(conn, PREDICTIONS).on_conflict_do_nothing().returning(PREDICTIONS.c.id),
                                      chunk)
                added += len(result.fetchall())
            by_model: dict[str, list] = {}
            for r in rows:
                by_model.setdefault(r["model"], []).append((r["request_id"], r["item"]))
            for model, keys in by_model.items():  # an answer that arrives after its label (another version's) is tallied
                self._tally(conn, model, keys)
            conn.execute(_insert(conn, OFFSETS).values(segment=segment, offset=offset, time=now)
                         .on_conflict_do_update(index_elements=["segment"], set_={"offset": offset, "time": now}))
        return added

    @staticmethod
    def _row(line: dict) -> dict:
        import base64

        upload = line.get("upload")
        return {"model": line["model"], "version": line["version"], "request_id": str(line["request_id"])[:128],
                "item": int(line["item"]), "time": float(line["time"]), "label": line["label"],
                "class_index": int(line["class_index"]), "confidence": float(line["confidence"]),
                "uncertain": bool(line["uncertain"]), "ood": bool(line["ood"]), "ood_score": line.get("ood_score"),
                "tta_views": int(line["tta_views"]), "flag": flag(line["uncertain"], line["ood"]),
                "review": bool(line["review"]), "input_shape": json.dumps(line["input"]["shape"]),
                "input": base64.b64decode(line["input"]["zlib"]),
                "upload": base64.b64decode(upload) if upload else None, "tallied": False}

    def forget_segment(self, segment: str) -> None:
        with self._write() as conn:
            conn.execute(OFFSETS.delete().where(OFFSETS.c.segment == segment))

    # --- labels ----------------------------------------------------------------------------------------
    def classes(self, conn: Connection, model: str) -> tuple[str, ...]:
        row = conn.execute(select(MODELS.c.classes).where(MODELS.c.model == model)
                           .order_by(MODELS.c.first_seen.desc()).limit(1)).scalar()
        if row is None:
            raise UnknownModel(f"No answer of a model named {model!r} is recorded here; label answers of a served "
                               "model (GET /models on the management port lists them).")
        return tuple(json.loads(row))

    def model_classes(self, model: str) -> tuple[str, ...]:
        with self.engine.connect() as conn:
            return self.classes(conn, model)

    def label(self, model: str, labels: list[Label]) -> list[dict]:
        """Record labels, all or none. The same label again is accepted and changes nothing; another label for an
        answer already labelled is refused (409 LabelConflict) and kept as a dispute."""
        now = time.time()
        disputes = []
        try:
            with self._write() as conn:
                classes = self.classes(conn, model)
                parsed = [(lab, *parse_label(lab.value, classes, f"[{i}]: " if len(labels) > 1 else ""))
                          for i, lab in enumerate(labels)]
                keys = list({(lab.request_id, lab.item) for lab, _, _ in parsed})
                answers: dict[tuple, dict[str, str]] = {}
                standing: dict[tuple, str] = {}
                for chunk in _chunks(keys):
                    for rid, item, version, predicted in conn.execute(
                            select(PREDICTIONS.c.request_id, PREDICTIONS.c.item, PREDICTIONS.c.version,
                                   PREDICTIONS.c.label)
                            .where(PREDICTIONS.c.model == model,
                                   tuple_(PREDICTIONS.c.request_id, PREDICTIONS.c.item).in_(chunk))):
                        answers.setdefault((rid, item), {})[version] = predicted
                    for rid, item, text in conn.execute(
                            select(FEEDBACK.c.request_id, FEEDBACK.c.item, FEEDBACK.c.label)
                            .where(FEEDBACK.c.model == model, tuple_(FEEDBACK.c.request_id, FEEDBACK.c.item).in_(chunk))):
                        standing[(rid, item)] = text
                missing = [f"{lab.request_id}" + (f" (index {lab.item})" if lab.item else "")
                           for lab, _, _ in parsed if (lab.request_id, lab.item) not in answers]
                if missing:
                    raise UnknownRequest(
                        f"No recorded answer of {model} has the request id {', '.join(missing[:5])}"
                        f"{' and others' if len(missing) > 5 else ''}. Use the X-Request-ID header of the answer "
                        "(and \"index\" for an image of an \"instances\" request); answers are kept for the store's "
                        "retention only.", unknown=[lab.request_id for lab, _, _ in parsed
                                                    if (lab.request_id, lab.item) not in answers][:100])
                results, new, seen = [], [], {}
                conflicts = []
                for lab, text, index in parsed:
                    key = (lab.request_id, lab.item)
                    current = standing.get(key, seen.get(key))
                    if current is not None and current != text:
                        conflicts.append({"request_id": lab.request_id, "index": lab.item, "label": text,
                                          "standing": current})
                        continue
                    if current is None:
                        new.append({"model": model, "request_id": lab.request_id, "item": lab.item, "label": text,
                                    "class_index": index, "time": now})
                        seen[key] = text
                    results.append({"request_id": lab.request_id, "index": lab.item, "label": text,
                                    "status": "recorded" if current is None else "unchanged",
                                    "versions": {v: {"predicted": p, "correct": p == text}
                                                 for v, p in sorted(answers[key].items())}})
                if conflicts:
                    disputes = conflicts
                    raise LabelConflict(
                        f"{len(conflicts)} answer(s) already have another label: the first label given stands "
                        f"(e.g. {conflicts[0]['request_id']}: {conflicts[0]['standing']!r}, you sent "
                        f"{conflicts[0]['label']!r}). Nothing in this request was recorded; the disagreement is "
                        "kept as a dispute. Leave these out and send the rest again.", conflicts=conflicts[:100])
                if new:
                    conn.execute(FEEDBACK.insert(), new)
                    self._tally(conn, model, [(n["request_id"], n["item"]) for n in new])
                return results
        except IntegrityError:  # another recorder (PostgreSQL) labelled the same answer at the same moment: decide again
            return self.label(model, labels)
        finally:
            if disputes:
                with self._write() as conn:
                    conn.execute(DISPUTES.insert(), [{"model": model, "request_id": d["request_id"], "item": d["index"],
                                                      "label": d["label"], "standing": d["standing"], "time": now}
                                                     for d in disputes])

    def _tally(self, conn: Connection, model: str, keys: list[tuple[str, int]]) -> None:
        """Count the labelled answers among ``keys`` not counted yet (each answer row once, whoever gets there first)."""
        for chunk in _chunks(list(set(keys))):
            labelled = conn.execute(
                select(FEEDBACK.c.request_id, FEEDBACK.c.item, FEEDBACK.c.label)
                .where(FEEDBACK.c.model == model, tuple_(FEEDBACK.c.request_id, FEEDBACK.c.item).in_(chunk))).all()
            if not labelled:
                continue
            truth = {(rid, item): text for rid, item, text in labelled}
            claimed = conn.execute(
                PREDICTIONS.update()
                .where(PREDICTIONS.c.model == model, PREDICTIONS.c.tallied.is_(False),
                       tuple_(PREDICTIONS.c.request_id, PREDICTIONS.c.item).in_(list(truth)))
                .values(tallied=True)
                .returning(PREDICTIONS.c.version, PREDICTIONS.c.flag, PREDICTIONS.c.label, PREDICTIONS.c.request_id,
                           PREDICTIONS.c.item)).all()
            counts: dict[tuple, list[int]] = {}
            for version, answer_flag, predicted, rid, item in claimed:
                given = truth[(rid, item)]
                c = counts.setdefault((version, answer_flag, given), [0, 0])
                c[0] += 1
                c[1] += int(predicted == given)
            for (version, answer_flag, given), (n, correct) in counts.items():
                stmt = _insert(conn, TALLY).values(model=model, version=version, flag=answer_flag, label=given,
                                                   labelled=n, correct=correct)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["model", "version", "flag", "label"],
                    set_={"labelled": TALLY.c.labelled + stmt.excluded.labelled,
                          "correct": TALLY.c.correct + stmt.excluded.correct}))

    # --- reading -----------------------------------------------------------------------------------------
    def tally(self, model: str | None = None) -> list[tuple]:
        with self.engine.connect() as conn:
            query = select(TALLY.c.model, TALLY.c.version, TALLY.c.flag, TALLY.c.label, TALLY.c.labelled, TALLY.c.correct)
            if model is not None:
                query = query.where(TALLY.c.model == model)
            return [tuple(r) for r in conn.execute(query)]

    def versions(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """model -> version -> class names, for every version that has a recorded answer."""
        with self.engine.connect() as conn:
            out: dict[str, dict[str, tuple[str, ...]]] = {}
            for model, version, classes in conn.execute(select(MODELS.c.model, MODELS.c.version, MODELS.c.classes)):
                out.setdefault(model, {})[version] = tuple(json.loads(classes))
            return out

    def summary(self, model: str) -> dict:
        """Per version: labelled answers, how many were right, the accuracy with its 95 % Wilson interval, and the
        same by the answer's flag and by the label given; plus answers recorded and disputes."""
        with self.engine.connect() as conn:
            self.classes(conn, model)  # 404 for a model never recorded
            recorded = dict(conn.execute(select(PREDICTIONS.c.version, func.count())
                                         .where(PREDICTIONS.c.model == model).group_by(PREDICTIONS.c.version)).all())
            disputes = conn.execute(select(func.count()).select_from(DISPUTES).where(DISPUTES.c.model == model)).scalar()
            known = [v for (v,) in conn.execute(select(MODELS.c.version).where(MODELS.c.model == model))]
        versions: dict[str, dict] = {}
        for _, version, answer_flag, given, n, correct in self.tally(model):
            v = versions.setdefault(version, {"n": 0, "c": 0, "flag": {}, "label": {}})
            v["n"] += n
            v["c"] += correct
            for key, part in (("flag", answer_flag), ("label", given)):
                counts = v[key].setdefault(part, [0, 0])
                counts[0] += n
                counts[1] += correct
        out = {}
        for version in sorted(set(known) | set(versions)):
            v = versions.get(version, {"n": 0, "c": 0, "flag": {}, "label": {}})
            out[version] = {**figures(v["n"], v["c"]),
                            "by_flag": {f: figures(*v["flag"].get(f, [0, 0])) for f in FLAGS},
                            "by_label": {k: figures(*c) for k, c in sorted(v["label"].items())},
                            "recorded": int(recorded.get(version, 0))}
        return {"model": model, "versions": out, "disputes": int(disputes or 0)}

    def review(self, model: str, limit: int = 10, confident_every: int = 4, skip: Iterable[tuple[str, int]] = ()) -> list[dict]:
        """What to label next: unlabelled answers of the review sample, out-of-distribution and uncertain ones first
        (newest first), with every ``confident_every``-th place given to a confident answer of the random share, so
        labelling works through the hard cases and still estimates the confident answers' accuracy without bias."""
        skip = set(skip)
        unlabelled = ~exists().where(and_(FEEDBACK.c.model == PREDICTIONS.c.model,
                                          FEEDBACK.c.request_id == PREDICTIONS.c.request_id,
                                          FEEDBACK.c.item == PREDICTIONS.c.item))
        cols = [PREDICTIONS.c.request_id, PREDICTIONS.c.item, PREDICTIONS.c.version, PREDICTIONS.c.time,
                PREDICTIONS.c.label, PREDICTIONS.c.class_index, PREDICTIONS.c.confidence, PREDICTIONS.c.uncertain,
                PREDICTIONS.c.ood, PREDICTIONS.c.ood_score, PREDICTIONS.c.flag, PREDICTIONS.c.input_shape,
                PREDICTIONS.c.input, PREDICTIONS.c.upload]
        fetch = (limit + len(skip)) * 2 + 8
        with self.engine.connect() as conn:
            classes = self.classes(conn, model)
            base = select(*cols).where(PREDICTIONS.c.model == model, PREDICTIONS.c.review.is_(True), unlabelled)
            hard = conn.execute(base.where(PREDICTIONS.c.flag != "confident")
                                .order_by(PREDICTIONS.c.ood.desc(), PREDICTIONS.c.time.desc()).limit(fetch)).all()
            easy = conn.execute(base.where(PREDICTIONS.c.flag == "confident")
                                .order_by(PREDICTIONS.c.time.desc()).limit(fetch)).all()

        def unique(rows):
            seen = set()
            for r in rows:
                key = (r.request_id, r.item)
                if key not in seen and key not in skip:
                    seen.add(key)
                    yield r

        hard_it, easy_it = unique(hard), unique(easy)
        out = []
        while len(out) < limit:
            first, second = (easy_it, hard_it) if (len(out) + 1) % confident_every == 0 else (hard_it, easy_it)
            row = next(first, None) or next(second, None)
            if row is None:
                break
            reason = "out_of_distribution" if row.ood else "uncertain" if row.uncertain else "random sample"
            out.append({"request_id": row.request_id, "index": row.item, "version": row.version, "time": row.time,
                        "label": row.label, "class_index": row.class_index, "confidence": row.confidence,
                        "uncertain": row.uncertain, "out_of_distribution": row.ood, "ood_score": row.ood_score,
                        "reason": reason, "input_shape": json.loads(row.input_shape), "input": row.input,
                        "upload": row.upload, "classes": classes})
        return out

    def labelled(self, model: str, after: int = 0, limit: int = 500) -> list[dict]:
        """Labelled answers in label order (feedback id > ``after``): the label, the answer (the newest version's),
        its canonical input, and whether the label was disputed."""
        with self.engine.connect() as conn:
            self.classes(conn, model)
            rows = conn.execute(
                select(FEEDBACK.c.id, FEEDBACK.c.request_id, FEEDBACK.c.item, FEEDBACK.c.label, FEEDBACK.c.class_index,
                       PREDICTIONS.c.version, PREDICTIONS.c.label.label("predicted"), PREDICTIONS.c.flag,
                       PREDICTIONS.c.input_shape, PREDICTIONS.c.input, PREDICTIONS.c.time)
                .join(PREDICTIONS, and_(PREDICTIONS.c.model == FEEDBACK.c.model,
                                        PREDICTIONS.c.request_id == FEEDBACK.c.request_id,
                                        PREDICTIONS.c.item == FEEDBACK.c.item))
                .where(FEEDBACK.c.model == model, FEEDBACK.c.id > after)
                .order_by(FEEDBACK.c.id, PREDICTIONS.c.time.desc()).limit(limit * 4)).all()
            disputed = {(rid, item) for rid, item in conn.execute(
                select(DISPUTES.c.request_id, DISPUTES.c.item).where(DISPUTES.c.model == model))}
        out, seen = [], set()
        for r in rows:
            if r.id in seen:
                continue
            seen.add(r.id)
            out.append({"id": r.id, "request_id": r.request_id, "index": r.item, "label": r.label,
                        "class_index": r.class_index, "version": r.version, "predicted": r.predicted, "flag": r.flag,
                        "input_shape": json.loads(r.input_shape), "input": r.input,
                        "disputed": (r.request_id, r.item) in disputed})
            if len(out) == limit:
                break
        return out

    # --- two versions on the same requests (a shadow or canary rollout) -----------------------------------------
    def _pairs(self, model: str, baseline: str, candidate: str):
        a, b = PREDICTIONS.alias("a"), PREDICTIONS.alias("b")
        joined = a.join(b, and_(b.c.model == a.c.model, b.c.request_id == a.c.request_id, b.c.item == a.c.item,
                                b.c.version == candidate))
        return a, b, joined, and_(a.c.model == model, a.c.version == baseline)

    def compare(self, model: str, baseline: str, candidate: str, limit: int = 100_000) -> dict:
        """The answers both versions gave to the same requests (newest first, at most ``limit``), side by side, with
        the label given where there is one; and how many answers each version gave that the other did not."""
        a, b, joined, where = self._pairs(model, baseline, candidate)
        cols = [a.c.request_id, a.c.item, a.c.time, a.c.label, a.c.confidence, a.c.uncertain, a.c.ood,
                b.c.label, b.c.confidence, b.c.uncertain, b.c.ood, FEEDBACK.c.label]
        query = (select(*cols).select_from(joined.outerjoin(FEEDBACK, and_(
                    FEEDBACK.c.model == a.c.model, FEEDBACK.c.request_id == a.c.request_id, FEEDBACK.c.item == a.c.item)))
                 .where(where).order_by(a.c.time.desc()).limit(limit))
        with self.engine.connect() as conn:
            self.classes(conn, model)
            rows = conn.execute(query).all()
            counts = dict(conn.execute(select(PREDICTIONS.c.version, func.count()).where(
                PREDICTIONS.c.model == model, PREDICTIONS.c.version.in_([baseline, candidate]))
                .group_by(PREDICTIONS.c.version)).all())
            paired = conn.execute(select(func.count()).select_from(joined).where(where)).scalar() or 0
        names = ("request_id", "item", "time", "label", "confidence", "uncertain", "ood")
        pairs = [{**dict(zip(names, r[:7])), "candidate": {"label": r[7], "confidence": r[8], "uncertain": bool(r[9]),
                                                            "ood": bool(r[10])}, "truth": r[11]} for r in rows]
        for p in pairs:
            p["uncertain"], p["ood"] = bool(p["uncertain"]), bool(p["ood"])
        return {"model": model, "baseline": baseline, "candidate": candidate, "paired": int(paired),
                "recorded": {v: int(counts.get(v, 0)) for v in (baseline, candidate)}, "pairs": pairs}

    def compare_counts(self, model: str, baseline: str, candidate: str) -> dict:
        """For the Prometheus gauges: answers both gave, how many agree, and each side's uncertain and
        out-of-distribution answers among them."""
        a, b, joined, where = self._pairs(model, baseline, candidate)
        s = lambda cond: func.coalesce(func.sum(case((cond, 1), else_=0)), 0)  # noqa: E731
        with self.engine.connect() as conn:
            row = conn.execute(select(func.count(), s(a.c.label == b.c.label), s(a.c.uncertain.is_(True)),
                                      s(b.c.uncertain.is_(True)), s(a.c.ood.is_(True)), s(b.c.ood.is_(True)))
                               .select_from(joined).where(where)).one()
        return dict(zip(("paired", "agreeing", "uncertain_live", "uncertain_candidate", "ood_live", "ood_candidate"),
                        (int(x) for x in row)))

    def known(self, model: str, request_id: str, item: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(PREDICTIONS.c.id).where(
                PREDICTIONS.c.model == model, PREDICTIONS.c.request_id == request_id,
                PREDICTIONS.c.item == item).limit(1)).first() is not None

    # --- retention ------------------------------------------------------------------------------------------
    def size(self) -> tuple[int, int]:
        """(answers, estimated bytes) of the recorded answers."""
        with self.engine.connect() as conn:
            n, inputs, uploads = conn.execute(select(func.count(), func.coalesce(func.sum(func.length(PREDICTIONS.c.input)), 0),
                                                     func.coalesce(func.sum(func.length(PREDICTIONS.c.upload)), 0))).one()
        return int(n), int(inputs) + int(uploads) + int(n) * ROW_OVERHEAD

    def prune(self, max_age_s: float | None, max_bytes: int | None, batch: int = 2000) -> int:
        """Delete unlabelled answers older than ``max_age_s``, then the oldest unlabelled ones while the answers take more
        than ``max_bytes``. Labelled answers stay (they are the retraining set; labels come at a person's pace)."""
        labelled = exists().where(and_(FEEDBACK.c.model == PREDICTIONS.c.model,
                                       FEEDBACK.c.request_id == PREDICTIONS.c.request_id,
                                       FEEDBACK.c.item == PREDICTIONS.c.item))
        removed = 0
        if max_age_s:
            with self._write() as conn:
                removed += conn.execute(PREDICTIONS.delete().where(PREDICTIONS.c.time < time.time() - max_age_s,
                                                                   ~labelled)).rowcount
        while max_bytes:
            n, size = self.size()
            if size <= max_bytes or n == 0:
                break
            excess = max(1, min(batch, int(math.ceil((size - max_bytes) / max(1, size / n)))))
            with self._write() as conn:
                oldest = select(PREDICTIONS.c.id).where(~labelled).order_by(PREDICTIONS.c.time).limit(excess)
                gone = conn.execute(PREDICTIONS.delete().where(PREDICTIONS.c.id.in_(oldest.scalar_subquery()))).rowcount
            removed += gone
            if not gone:  # only labelled answers left
                break
        if removed and self.sqlite:
            with self._write() as conn:
                conn.exec_driver_sql("PRAGMA incremental_vacuum")
        return removed

    # --- Prometheus -------------------------------------------------------------------------------------------
    def metrics_lines(self) -> list[str]:
        """``feedback_labelled_total`` and ``feedback_correct_total`` per (model, version, flag, label given), at 0 for
        every combination of a recorded version (so a first label is an increase), and ``feedback_disputes_total``."""
        counts = {(m, v, f, lab): (n, c) for m, v, f, lab, n, c in self.tally()}
        for model, versions in self.versions().items():
            for version, classes in versions.items():
                for f in FLAGS:
                    for lab in (*classes, NOT_A_GARMENT):
                        counts.setdefault((model, version, f, lab), (0, 0))
        with self.engine.connect() as conn:
            disputes = dict(conn.execute(select(DISPUTES.c.model, func.count()).group_by(DISPUTES.c.model)).all())
        out = ["# HELP feedback_labelled_total Recorded answers labelled through the feedback API (the first label of "
               "each answer), by the answer's version and flag and the label given.",
               "# TYPE feedback_labelled_total counter"]
        lines_correct = ["# HELP feedback_correct_total Of those, the answers whose label was the one given.",
                         "# TYPE feedback_correct_total counter"]
        for (m, v, f, lab), (n, c) in sorted(counts.items()):
            labels = f'ModelName="{_esc(m)}",ModelVersion="{_esc(v)}",Flag="{f}",Label="{_esc(lab)}"'
            out.append(f"feedback_labelled_total{{{labels}}} {n}")
            lines_correct.append(f"feedback_correct_total{{{labels}}} {c}")
        out += lines_correct
        out += ["# HELP feedback_disputes_total Labels refused because the answer already had another label.",
                "# TYPE feedback_disputes_total counter"]
        out += [f'feedback_disputes_total{{ModelName="{_esc(m)}"}} {disputes.get(m, 0)}' for m in sorted(
            set(self.versions()) | set(disputes))]
        return out


def _esc(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
