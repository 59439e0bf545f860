"""The workers' data jobs as the status page and `reconcile status` show them: `read`
gathers the rows (`data_jobs`, `data_workers`, procrastinate's job of a running row),
`view` (PURE) makes what both print. Without workers (SQLite, the embedded default) the
tables are empty and the view is `empty`: neither face shows a workers section."""
