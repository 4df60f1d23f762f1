"""Durable batch jobs: ``/v1/jobs`` uploads a recorded video, a worker pool runs :func:`process_video` on it.

Durable with no extra server: job records live in SQLite (stdlib ``sqlite3``, WAL journal) and files in
``<data_dir>/<job id>/``. The database is the truth, the in-memory queue only a wake-up list, so a
server that stops or crashes loses nothing: at start, queued jobs run and jobs found ``running`` (the
process died under them) go back to the queue, restart from the beginning and say so
(``restarted: true``, ``attempts`` > 1).

Workers submit frames with ``Priority.BATCH`` to the same :class:`~service.engine.InferenceEngine`
that live sessions use, so a long job never delays a display client. Job ids come from
``secrets.token_urlsafe`` and are checked against :data:`~service.jobs.store.JOB_ID` before they touch
the filesystem; result names are checked against the job's own list of produced files.

Across machines (``VIDENT_JOBS_BROKER=redis://...``): records live in Redis and a shared queue feeds
``vident worker`` processes on any node; :mod:`service.jobs_queue` implements that mode behind the same
API (:func:`~service.jobs.manager.make_manager` picks one), and the single-machine path needs neither
Redis nor its client.

By concern:

* :mod:`service.jobs.store`: the job record (:class:`~service.jobs.store.Job`) and its SQLite store;
* :mod:`service.jobs.manager`: running jobs: the worker threads, the retention sweep, progress, errors;
* :mod:`service.jobs.upload`: the streamed multipart upload and its option fields;
* :mod:`service.jobs.routes`: the HTTP API, mounted by ``service.app.create_app`` (which enters its
  ``lifespan``: jobs then use the app's engine pool) or by :func:`~service.jobs.routes.mount_jobs` in
  any FastAPI app; ``uvicorn --factory service.jobs.routes:create_standalone_app`` serves it alone.

Settings: ``Settings.jobs`` (:class:`~service.settings.JobsSettings`, ``VIDENT_JOBS_*``), with the
model, runtime, weights and pixel budget shared with live streaming.
"""
