"""The Prefect flows: intake, and resume (the hourly run). INTERFACE STUB, being implemented.

Public interface (stable; other modules may import these names now):

    read_items(path) -> list[dict]
        Items from a CSV file (header row; every value a string) or a JSON-lines file
        (one JSON object per line; ``.jsonl``/``.ndjson``; ``.json`` may hold a list).
        Raises ValueError naming the file and line for anything unreadable.

    resolve_process(code) -> Process
        The process with this code among TRACKING_PROCESSES (UnknownProcessError otherwise).

    deployment_name(code) -> str
        "resume/<code lower-cased, '_' -> '-'>", the Prefect deployment of that process.

    intake_flow(process: str, items: list[dict] | None = None, path: str | None = None,
                source: str | None = None, database_url: str | None = None) -> dict
        Prefect flow "intake": start_or_resume every item; returns
        {"process", "total", "new", "duplicates", "uuids"}.

    resume_flow(process: str, uuid: str | None = None, granularity: str = "stage",
                batch_size: int = 100, concurrency: int = 8, max_stages: int | None = None,
                max_seconds: float | None = None, lease_seconds: int | None = None,
                database_url: str | None = None) -> dict
        Prefect flow "resume": runs every runnable stage of the process (or of the one
        transaction ``uuid``) platform by platform; returns a summary dict
        {"process", "flow_run_id", "stages_run", "recovered_leases",
         "by_platform": {platform: {outcome: count}}, "top_errors": [...], "stopped": reason}.
"""
