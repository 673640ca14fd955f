"""The Manhattan world-model task: street graphs, walks, the task, and the world-model metrics."""
