"""The query service: a DuckDB projection of EVENTS and TELEMETRY, served over HTTP.

    tables       the DuckDB schema (one file, written by this process only)
    fold         a job's record from its events, as a pure function
    rows         decoded bus messages -> column batches (Arrow) for INSERT ... SELECT
    writer       the one writer: a batch and its stream sequences in one transaction
    ingest       pull from the streams from the applied sequence on, in bounded batches
    kvpoll       workers, leases and node inventory from their KV buckets
    queries      the read side: every SQL the API runs (the benchmark runs it raw too)
    api          the Litestar app: routes, tokens, problems, CORS, rate limits
    service      all of it in one process: `jetfleet run query`
"""
