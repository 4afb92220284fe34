"""Rollouts (`convstack rollout ...`): plan, gates, watch, config stores, history and report.

Above the model server: it edits the `models.config` that servers poll and watches them through
the client; the server never imports it.
"""
