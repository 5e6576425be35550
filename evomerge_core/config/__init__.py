"""The run config: its schema (pydantic), loading, and the task-runner setting."""
