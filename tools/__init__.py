"""Research probes and one-off measurements behind docs/experiments.md and docs/performance.md; not installed."""
