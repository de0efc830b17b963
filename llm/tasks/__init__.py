"""
Chat tasks: datasets of conversations (llm.conversation) with their scoring.

    from llm.tasks import build_task, build_mixture
    task = build_task("gsm8k", "test")          # real GSM8K, shipped with the package
    conversation = task[0]                      # {"messages": [...], "task": "gsm8k"}
    task.score(conversation, "... #### 18")     # True / False
"""

from llm.tasks.answers import extract_answer, numbers_equal
from llm.tasks.base import Task, TaskMixture
from llm.conversation import prompt_of, validate_conversation
from llm.tasks.hub import HubUnavailableError, fixture_path
from llm.tasks.registry import TASKS, build_mixture, build_task

__all__ = [
    "TASKS", "HubUnavailableError", "Task", "TaskMixture", "build_mixture", "build_task", "extract_answer",
    "fixture_path", "numbers_equal", "prompt_of", "validate_conversation",
]
