"""Batch jobs across machines: records in Redis, a Dramatiq queue on the same Redis, ``vident worker`` processes.

``vident serve`` with ``VIDENT_JOBS_BROKER=redis://...`` (:class:`QueuedJobManager`) writes the upload to the
shared data folder (``VIDENT_JOBS_DATA_DIR``, mounted by every node), records the job in Redis and sends one
message naming it; it runs no job itself. ``vident worker`` (:class:`JobWorker`) takes messages, runs the job
with its own engines and writes the record. Any API replica answers ``/v1/jobs`` from the shared records.

Why it survives a worker that dies (docs/jobs.md, "Across machines", has the whole argument):

* Dramatiq's Redis broker keeps a fetched message in the worker's ack set until the actor returns; a worker
  whose heartbeat stops for ``heartbeat_timeout_s`` has its unacked messages put back on the queue by the
  next live worker that polls. That is the redelivery.
* The record, not the message, decides what runs: :meth:`RedisJobStore.claim` is one Lua script that starts
  the next attempt (``attempts + 1``), refuses a job whose runs ended with their worker dying
  ``max_attempts`` times (it ends ``failed`` with the reason, as on one machine), and skips messages for
  jobs that are finished, deleted, or still held by a live worker. Every later write of a run names its
  attempt, so a run that lost its job (its worker was presumed dead) stops at its next progress write.
* A run writes into its own ``.out-<attempt>-<worker>`` folder and renames it to ``out`` when complete: a
  rename is atomic on one filesystem and fails when ``out`` exists, so readers never see half a set of
  results and only one complete set is ever published.

Redis and Dramatiq are imported here only: the single-machine path never loads this module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.jobs.manager import JobManager, job_error, own_engines, progress_writer, run_job
from service.jobs.store import JOB_ID, Job, JobsUnavailable
from service.process import Cancelled
from service.settings import Settings

log = logging.getLogger("vident.jobs")

PREFIX = "vident:jobs"  # every key this module writes starts with it
NAMESPACE = "vident:dramatiq"  # the Dramatiq broker's keys
QUEUE = "jobs"
ACTOR = "run_job"
_WORKER_TIMEOUT_MS = 1000  # how often an idle worker polls; every poll also heartbeats and looks for dead workers

# Fields stored as JSON (lists) and as integers; the rest are strings or floats.
_JSON_FIELDS = ("warnings", "files")
_INT_FIELDS = ("max_frames", "input_bytes", "frames_done", "frames_total", "attempts", "stops")
_BOOL_FIELDS = ("frames", "restarted")
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at")

# KEYS: the job's hash, the finished index. ARGV: job id, worker, now, max_attempts, error template, alive prefix.
# Answers {outcome, number}: claimed (attempt), missing, finished, failed (crashes counted), busy (a live worker
# runs it, by its last status; number: milliseconds until that worker's heartbeat key expires unless refreshed).
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', 0} end
if state ~= 'queued' and state ~= 'running' then return {'finished', 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if state == 'running' then
  local holder = redis.call('HGET', KEYS[1], 'worker')
  local status = holder and redis.call('GET', ARGV[6] .. holder)
  if status then  -- the holder is alive; it keeps the job if its last status says it runs it
    local ok, decoded = pcall(cjson.decode, status)
    for _, run in ipairs(ok and decoded['running'] or {}) do
      if run['job'] == ARGV[1] then return {'busy', redis.call('PTTL', ARGV[6] .. holder)} end
    end
  end
  local crashes = attempts - tonumber(redis.call('HGET', KEYS[1], 'stops') or '0')
  if crashes >= tonumber(ARGV[4]) then
    local error = string.gsub(ARGV[5], '{crashes}', tostring(crashes))
    redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', ARGV[3], 'error', error)
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
    return {'failed', crashes}
  end
  redis.call('HSET', KEYS[1], 'restarted', '1')
end
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'state', 'running', 'attempts', attempts, 'started_at', ARGV[3], 'frames_done', 0,
           'worker', ARGV[2])
redis.call('HDEL', KEYS[1], 'error', 'frames_total')
return {'claimed', attempts}
"""

# A write of one run: only while the job is running and still on that run's attempt (fencing). KEYS: the hash.
# ARGV: attempt, then field/value pairs to set.
_UPDATE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
return 1
"""

# The end of a run, as _UPDATE plus the finished index. KEYS: the hash, the finished index.
# ARGV: attempt, job id, finished_at, then field/value pairs.
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[3], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
"""

# A graceful stop interrupted the run: it does not count against max_attempts, and the job has no holder, so
# the next claim need not wait for this worker's heartbeat to expire. KEYS: the hash. ARGV: attempt.
_STOPPED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'stops', 1)
redis.call('HDEL', KEYS[1], 'worker')
return 1
"""


def connect(url: str) -> redis.Redis:
    """A client that gives up on a dead server within seconds instead of hanging a request or a worker.
    Connects lazily; a URL redis-py cannot parse (a port that is not a number) is :class:`JobsUnavailable`."""
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30)
    except ValueError as exc:
        raise JobsUnavailable(f"the job broker URL {_safe_url(url)} is not valid ({exc})") from None


@contextlib.contextmanager
def _reachable(url: str) -> Iterator[None]:
    """Redis errors become :class:`JobsUnavailable` (503 in the API) with the broker's address, never its password."""
    try:
        yield
    except redis.RedisError as exc:
        raise JobsUnavailable(f"the job broker at {_safe_url(url)} is unreachable ({exc})") from exc


def _safe_url(url: str) -> str:
    host = url.split("@")[-1] if "@" in url else url.split("://")[-1]
    return f"{url.split('://')[0]}://{host}"


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def _decode(fields: dict[bytes, bytes]) -> Job:
    raw = {key.decode(): value.decode() for key, value in fields.items()}
    values: dict[str, Any] = {}
    for name, text in raw.items():
        if name in _JSON_FIELDS:
            values[name] = json.loads(text)
        elif name in _INT_FIELDS:
            values[name] = int(text)
        elif name in _BOOL_FIELDS:
            values[name] = text == "1"
        elif name in _FLOAT_FIELDS:
            values[name] = float(text)
        elif name in ("id", "state", "model", "input_name", "input_file", "error", "worker"):
            values[name] = text
    values.setdefault("max_frames", None)  # None is stored as an absent field
    return Job(**values)


@dataclass(frozen=True)
class Claim:
    outcome: str  # claimed, missing, finished, busy, failed
    number: int  # claimed: the attempt; busy: ms left on the holder's heartbeat; failed: the crashes counted


class RedisJobStore:
    """Job records as Redis hashes (``vident:jobs:job:<id>``), indexed by creation and by finishing time.

    The operations a run makes are Lua scripts (atomic on the server) that name the run's attempt, so two
    workers that both believe they hold a job cannot both write it: the older run's writes are refused.
    """

    def __init__(self, client: redis.Redis, url: str = "redis://") -> None:
        self.client = client
        self.url = url
        self._claim = client.register_script(_CLAIM)
        self._update = client.register_script(_UPDATE)
        self._finish = client.register_script(_FINISH)
        self._stopped = client.register_script(_STOPPED)

    @staticmethod
    def key(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    created_key = f"{PREFIX}:created"
    finished_key = f"{PREFIX}:finished"
    alive_prefix = f"{PREFIX}:alive:"  # + worker name: exists while that worker's heartbeat is fresh

    def close(self) -> None:
        self.client.close()

    def insert(self, job: Job) -> None:
        fields = {name: _encode(getattr(job, name)) for name in Job.__dataclass_fields__}
        fields = {name: value for name, value in fields.items() if value != "None"}
        with _reachable(self.url):
            pipe = self.client.pipeline()
            pipe.hset(self.key(job.id), mapping=fields)
            pipe.zadd(self.created_key, {job.id: job.created_at})
            pipe.execute()

    def get(self, job_id: str) -> Job | None:
        with _reachable(self.url):
            fields = self.client.hgetall(self.key(job_id))
        return _decode(fields) if fields.get(b"state") else None

    def list(self, limit: int = 100) -> list[Job]:
        with _reachable(self.url):
            ids = [i.decode() for i in self.client.zrevrange(self.created_key, 0, limit - 1)]
            pipe = self.client.pipeline()
            for job_id in ids:
                pipe.hgetall(self.key(job_id))
            rows = pipe.execute()
        return [_decode(fields) for fields in rows if fields.get(b"state")]  # skips jobs deleted meanwhile

    def delete(self, job_id: str) -> bool:
        with _reachable(self.url):
            pipe = self.client.pipeline()
            pipe.delete(self.key(job_id))
            pipe.zrem(self.created_key, job_id)
            pipe.zrem(self.finished_key, job_id)
            return bool(pipe.execute()[0])

    def expired(self, before: float) -> list[Job]:
        with _reachable(self.url):
            ids = [i.decode() for i in self.client.zrangebyscore(self.finished_key, "-inf", before)]
        return [job for job in map(self.get, ids) if job is not None]

    def claim(self, job_id: str, worker: str, now: float, max_attempts: int) -> Claim:
        error = (
            "the workers running this job died {crashes} times (a crash, out of memory or a kill), the most this "
            f"deployment allows (max_attempts {max_attempts}); the job is not run again"
        )
        with _reachable(self.url):
            args = [job_id, worker, repr(now), max_attempts, error, self.alive_prefix]
            outcome, number = self._claim(keys=[self.key(job_id), self.finished_key], args=args)
        return Claim(outcome.decode(), int(number))

    def progress(self, job_id: str, attempt: int, done: int, total: int | None) -> bool:
        """False once the job is gone or belongs to a newer attempt: the run then cancels itself."""
        fields = ["frames_done", done] + (["frames_total", total] if total is not None else [])
        with _reachable(self.url):
            return bool(self._update(keys=[self.key(job_id)], args=[attempt, *fields]))

    def finish(self, job_id: str, attempt: int, state: str, now: float, **fields: Any) -> bool:
        assert state in ("done", "failed"), state
        pairs: list[Any] = ["state", state]
        for name, value in fields.items():
            pairs += [name, _encode(value)]
        with _reachable(self.url):
            return bool(
                self._finish(keys=[self.key(job_id), self.finished_key], args=[attempt, job_id, repr(now), *pairs])
            )

    def stopped(self, job_id: str, attempt: int) -> bool:
        with _reachable(self.url):
            return bool(self._stopped(keys=[self.key(job_id)], args=[attempt]))


class JobQueue:
    """The Dramatiq side: a Redis broker with the ``run_job`` actor on queue ``jobs``.

    Dramatiq's default middleware is left out on purpose: its time limit (10 min) would kill long videos,
    and its retries would rerun jobs whose error is the input's (a bad file fails the same way every time).
    Redelivery after a worker's death comes from the broker itself; attempts are counted in the record.
    """

    def __init__(self, url: str, heartbeat_timeout_s: float, run: Callable[[str], None] | None = None) -> None:
        self.url = url
        self.broker = RedisBroker(
            client=connect(url),
            namespace=NAMESPACE,
            middleware=[],
            heartbeat_timeout=int(heartbeat_timeout_s * 1000),
            # Every broker call also looks for dead workers: the check is a few Redis commands, idle workers
            # poll once a second, and so a dead worker's job comes back one heartbeat timeout after its death
            # instead of after a random number of calls.
            maintenance_chance=MAINTENANCE_SCALE,
        )
        self.actor = dramatiq.Actor(
            run or _refuse, broker=self.broker, actor_name=ACTOR, queue_name=QUEUE, priority=0, options={}
        )

    def send(self, job_id: str, delay_s: float | None = None) -> None:
        with _reachable(self.url):
            self.actor.send_with_options(args=(job_id,), delay=None if delay_s is None else int(delay_s * 1000))

    def depth(self) -> int:
        """Messages waiting for a worker: the length of the broker's list ``<namespace>:<queue>`` (the layout of
        Dramatiq's ``dispatch.lua``); taken and delayed messages are not counted."""
        with _reachable(self.url):
            return int(self.broker.client.llen(f"{NAMESPACE}:{QUEUE}"))

    def close(self) -> None:
        self.broker.client.close()


def _refuse(job_id: str) -> None:
    raise RuntimeError("an API replica does not run jobs")


class QueuedJobManager(JobManager):
    """``/v1/jobs`` of an API replica: uploads go to the shared folder, records to Redis, one message per job to
    the queue. It runs no job; it keeps the retention sweep (any replica may remove expired jobs; removing
    twice is harmless) and reports the queue and the workers on ``/metrics``."""

    store: RedisJobStore | None  # type: ignore[assignment]

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.queue: JobQueue | None = None

    def start(self) -> None:
        broker = self.settings.jobs.broker
        if not broker:
            raise ValueError("QueuedJobManager needs settings.jobs.broker")
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = RedisJobStore(connect(broker), broker)
        self.queue = JobQueue(broker, self.settings.jobs.heartbeat_timeout_s)
        try:
            with _reachable(broker):
                self.store.client.ping()
        except JobsUnavailable as exc:  # Redis may start after us (compose, Kubernetes): requests answer 503 until then
            log.warning("%s; /v1/jobs answers 503 until it is", exc)
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._sweep_loop, name="jobs-retention", daemon=True)]
        self._threads[0].start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def submit(self, job_id: str, model: str, max_frames: int | None, frames: bool, input_name: str, input_file: str,
               input_bytes: int) -> Job:  # fmt: skip
        assert self.queue is not None
        job = Job(job_id, "queued", model, max_frames, frames, input_name, input_file, input_bytes, time.time())
        self.db.insert(job)  # the record first: a worker that gets the message finds it
        try:
            self.queue.send(job_id)
        except JobsUnavailable:
            with contextlib.suppress(JobsUnavailable):
                self.db.delete(job_id)  # no message, no job: never a record that stays queued for ever
            raise
        return job

    def delete(self, job_id: str) -> Job | None:
        """A running job's worker notices at its next progress write (its record is gone), stops and removes
        the folder; otherwise the folder goes now (a queued job's message is skipped when it comes)."""
        job = self.db.get(job_id)
        if job is None or not self.db.delete(job_id):
            return None
        if job.state != "running":
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return job

    def metrics_collector(self) -> Collector:
        assert self.queue is not None and self.store is not None
        return QueueCollector(self.queue, self.store)


class QueueCollector(Collector):
    """``/metrics`` of an API replica in distributed mode, read from Redis at each scrape: the queue depth, the
    live workers and each worker's progress (what it runs now, frames done and total, jobs finished)."""

    def __init__(self, queue: JobQueue, store: RedisJobStore) -> None:
        self.queue = queue
        self.store = store

    def describe(self) -> list[Any]:
        return []  # names vary with the workers alive; without this, registering would query Redis

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("vident_jobs_broker_up", "1 when the job broker (Redis) answered this scrape")
        try:
            depth = self.queue.depth()
            workers = worker_statuses(self.store)
        except JobsUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("vident_jobs_queue_depth", "jobs waiting in the shared queue for a worker", value=depth)
        yield GaugeMetricFamily("vident_jobs_workers", "workers with a fresh heartbeat", value=len(workers))
        running = GaugeMetricFamily("vident_jobs_worker_running", "jobs the worker runs now", labels=["worker"])
        done = GaugeMetricFamily(
            "vident_jobs_worker_frames_done", "frames done of the jobs the worker runs now", labels=["worker"]
        )
        total = GaugeMetricFamily(
            "vident_jobs_worker_frames_total", "frames (when known) of the jobs the worker runs now", labels=["worker"]
        )
        finished = CounterMetricFamily(
            "vident_jobs_worker_finished", "jobs the worker finished since it started", labels=["worker", "state"]
        )
        for status in workers:
            name = status["name"]
            current = status["running"]
            running.add_metric([name], len(current))
            done.add_metric([name], sum(run["frames_done"] for run in current))
            total.add_metric([name], sum(run["frames_total"] or 0 for run in current))
            for state in ("done", "failed"):
                finished.add_metric([name, state], status["finished"][state])
        yield from (running, done, total, finished)


def worker_statuses(store: RedisJobStore) -> list[dict[str, Any]]:
    """The status every live worker last wrote (its key expires with its heartbeat); forgets dead ones."""
    client = store.client
    with _reachable(store.url):
        names = sorted(n.decode() for n in client.smembers(f"{PREFIX}:workers"))
        values = client.mget([store.alive_prefix + n for n in names]) if names else []
        gone = [name for name, value in zip(names, values, strict=True) if value is None]
        if gone:
            client.srem(f"{PREFIX}:workers", *gone)
    return [json.loads(value) for value in values if value is not None]


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Run:
    job_id: str
    attempt: int
    cancel: threading.Event
    frames_done: int = 0
    frames_total: int | None = None


class JobWorker:
    """``vident worker``: runs jobs from the shared queue with engines of its own (``VIDENT_BACKEND``,
    ``VIDENT_DEVICE``, ...), ``concurrent_jobs`` at a time, and never holds more messages than it runs.

    ``stop()`` (SIGTERM, Ctrl-C) cancels running jobs after their in-flight frames, counts the interruption
    as a stop (not a crash) and puts each job back on the queue for another worker.
    """

    def __init__(self, settings: Settings) -> None:
        broker = settings.jobs.broker
        if not broker:
            raise ValueError("a worker needs a broker URL (--broker or VIDENT_JOBS_BROKER)")
        self.settings = settings
        self.broker = broker
        self.name = settings.jobs.worker_name or default_worker_name()
        self.root = settings.jobs.data_dir.resolve()
        self.engines = own_engines(settings)
        self.store = RedisJobStore(connect(broker), broker)
        self.queue = JobQueue(broker, settings.jobs.heartbeat_timeout_s, self.handle)
        self.finished = {"done": 0, "failed": 0}
        self._runs: dict[str, _Run] = {}
        self._runs_lock = threading.Lock()
        self._stopping = threading.Event()  # set: cancel running jobs, take no new ones
        self._stopped = threading.Event()  # set once the Dramatiq worker has let go of its messages
        self._worker: dramatiq.Worker | None = None
        self._heartbeat: threading.Thread | None = None
        self.started_at = time.time()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with _reachable(self.broker):
            self._beat()  # registered (and a broker that does not answer said so) before any message is taken
        self._heartbeat = threading.Thread(target=self._beat_loop, name="jobs-heartbeat", daemon=True)
        self._heartbeat.start()
        threads = self.settings.jobs.concurrent_jobs
        self._worker = dramatiq.Worker(self.queue.broker, worker_threads=threads, worker_timeout=_WORKER_TIMEOUT_MS)
        self._worker.queue_prefetch = threads  # a busy worker must not sit on jobs another worker could run
        self._worker.start()
        log.info("worker %s: taking jobs from %s, data in %s", self.name, _safe_url(self.broker), self.root)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        with self._runs_lock:
            for run in self._runs.values():
                run.cancel.set()
        if self._worker is not None:
            self._worker.stop(timeout=int(timeout * 1000))
            self._worker = None
        self._stopped.set()  # the heartbeat ran until now: no job of ours looked abandoned meanwhile
        if self._heartbeat is not None:
            self._heartbeat.join(timeout)
        with contextlib.suppress(redis.RedisError):
            self.store.client.delete(self.store.alive_prefix + self.name)
            self.store.client.srem(f"{PREFIX}:workers", self.name)
        self.engines.close()
        self.queue.close()
        self.store.close()

    # liveness ------------------------------------------------------------------------------------
    def _beat(self) -> None:
        """Writes this worker's status with a time to live of one heartbeat timeout: while the key exists,
        claims leave its jobs alone; ``/metrics`` shows it."""
        with self._runs_lock:
            running = [{"job": r.job_id, "attempt": r.attempt, "frames_done": r.frames_done,
                        "frames_total": r.frames_total} for r in self._runs.values()]  # fmt: skip
        status = {"name": self.name, "started_at": self.started_at, "running": running, "finished": self.finished}
        pipe = self.store.client.pipeline()
        pipe.set(
            self.store.alive_prefix + self.name,
            json.dumps(status),
            px=int(self.settings.jobs.heartbeat_timeout_s * 1000),
        )
        pipe.sadd(f"{PREFIX}:workers", self.name)
        pipe.execute()

    def _beat_loop(self) -> None:
        interval = min(1.0, self.settings.jobs.heartbeat_timeout_s / 4)
        while not self._stopped.wait(interval):
            try:
                self._beat()
            except redis.RedisError as exc:  # Redis away for a moment: the next beat retries
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)

    # jobs ------------------------------------------------------------------------------------------
    def handle(self, job_id: str) -> None:
        """The actor: one delivery of one job's message. Never raises for a job's own failure (that is
        recorded), so Dramatiq acknowledges the message whatever the job's outcome."""
        if not JOB_ID.fullmatch(job_id):
            log.error("worker %s: ignoring a message with a malformed job id", self.name)
            return
        attempt = None
        try:
            if self._stopping.is_set():  # taken while stopping: leave it to another worker
                self.queue.send(job_id)
                return
            claim = self.store.claim(job_id, self.name, time.time(), self.settings.jobs.max_attempts)
            if claim.outcome == "claimed":
                attempt = claim.number
                self._run(job_id, attempt)
            else:
                self._skip(job_id, claim)
        except JobsUnavailable as exc:
            # Dramatiq acknowledges the message once this returns, whatever happened: put the job back first.
            log.error("job %s: %s; it goes back on the queue once Redis answers", job_id, exc)
            self._requeue_when_reachable(job_id, attempt)

    def _requeue_when_reachable(self, job_id: str, attempt: int | None) -> None:
        """After losing Redis mid-delivery: the interrupted run counts as a stop (not the job's fault, not a
        crash) and a new message goes out. Retries until Redis answers, as Dramatiq does with its acks."""
        while True:
            try:
                if attempt is not None:
                    self.store.stopped(job_id, attempt)
                self.queue.send(job_id)
                return
            except JobsUnavailable:
                time.sleep(2.0)

    def _skip(self, job_id: str, claim: Claim) -> None:
        if claim.outcome == "missing":  # deleted while queued
            shutil.rmtree(self.root / job_id, ignore_errors=True)
        elif claim.outcome == "busy":
            # Its worker's heartbeat key still lives: the broker saw that worker's death (or a pause) a moment
            # before the key expired. Look again just after the key would expire: a dead worker's job then
            # restarts without waiting another timeout, a live worker's key is fresh again and it keeps it.
            self.queue.send(job_id, delay_s=claim.number / 1000 + 0.25)
        elif claim.outcome == "failed":
            log.error("job %s: its workers died %d times; marked failed", job_id, claim.number)
        # finished: a duplicate delivery of a job that is done or failed; nothing to do

    def _run(self, job_id: str, attempt: int) -> None:
        job = self.store.get(job_id)
        if job is None:
            return
        folder = self.root / job_id
        if not (folder / job.input_file).is_file():
            # The upload is written before the job is queued and removed only once it is done: this worker does
            # not see the API replicas' folder. Every try here would fail alike, so the job ends with the reason.
            error = (
                f"worker {self.name} finds no upload in {folder}: every API replica and worker must mount the same "
                "folder at VIDENT_JOBS_DATA_DIR"
            )
            log.error("job %s: %s", job_id, error)
            if self.store.finish(job_id, attempt, "failed", time.time(), error=error):
                self.finished["failed"] += 1
            return
        for stale in folder.glob(".out-*"):  # what runs of earlier attempts left (their workers are gone)
            shutil.rmtree(stale, ignore_errors=True)
        staging = folder / f".out-{attempt}-{os.getpid()}"
        run = _Run(job_id, attempt, threading.Event())
        with self._runs_lock:
            self._runs[job_id] = run
        if self._stopping.is_set():
            run.cancel.set()

        def write(done: int, total: int | None) -> bool:
            run.frames_done, run.frames_total = done, total
            return self.store.progress(job_id, attempt, done, total)

        log.info("job %s: %s on %s (attempt %d, worker %s)", job_id, job.model, job.input_name, attempt, self.name)
        state = None
        try:
            result = run_job(
                job, folder, staging, self.engines.load(job.model).engine, self.settings,
                progress_writer(write, run.cancel), run.cancel,
            )  # fmt: skip
            publish(staging, folder / "out")
            if self.store.finish(job_id, attempt, "done", time.time(), **result):
                state = "done"
                (folder / job.input_file).unlink(missing_ok=True)  # done: the upload is no longer needed
        except JobsUnavailable:
            raise  # Redis is away, not the job's fault: handle() puts it back on the queue
        except Cancelled:
            if self._stopping.is_set() and self.store.stopped(job_id, attempt):
                self.queue.send(job_id)  # a graceful stop: another worker restarts the job from the beginning
                log.info("job %s: interrupted by this worker's stop; back on the queue", job_id)
        except Exception as exc:  # noqa: BLE001 - any job error is the job's, never the worker's
            if self.store.finish(job_id, attempt, "failed", time.time(), error=job_error(job, exc)):
                state = "failed"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with self._runs_lock:
                self._runs.pop(job_id, None)
        if state is not None:
            self.finished[state] += 1
        elif self.store.get(job_id) is None:  # deleted while it ran
            shutil.rmtree(folder, ignore_errors=True)


def publish(staging: Path, out: Path) -> bool:
    """Moves a complete set of results into place in one step (``rename`` is atomic within a filesystem, NFS
    included), so a reader sees no results or all of them. False when ``out`` exists already: another run of
    the same job published first, its results stand (runs of one job compute the same files) and ours go."""
    try:
        os.rename(staging, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True
