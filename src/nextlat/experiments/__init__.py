"""The paper's experiments: arms over seeds, queued runs, tables and figures."""
