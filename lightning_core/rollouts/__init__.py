"""Running user agents: one rollout per worker process, its spans exported, its outcome reported; the task datasets."""
