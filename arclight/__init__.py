"""Arclight from Python: ``arclight.train(...)`` runs the same flow as `arclight train`, in this process.

    import arclight
    from my_agent import run        # def run(task, ctx) -> reward, in a module file

    result = arclight.train(agent=run, dataset="train.jsonl", eval_dataset="test.jsonl", epochs=2,
                            rollouts={"group_size": 4}, evaluation={"every_epochs": 1})
    print(result.evaluations[-1]["reward_mean"], result.versions, result.lake, result.mlflow_uri)

Every other keyword is a config key (docs/config.md); docs/python-api.md has the rest.
"""

from arclight.api import TrainResult, config, train

__all__ = ["TrainResult", "config", "train"]
