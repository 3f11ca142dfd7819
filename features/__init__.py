"""Events, tasks, labels and point-in-time features (imports neither training nor serving)."""
