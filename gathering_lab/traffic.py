"""A pure model of GatheRing traffic: realistic agents, circles and tasks, no I/O.

A seeded discrete-event simulation of a small GatheRing deployment tells a
plausible story: circles are created and started, agents start and join them,
tasks are created in a circle's project, assigned to a member, started, use
tools, and complete or fail; agents talk, remember and share; now and then two
tasks collide or the system warns. The same seed always gives the same story.

::

    from gathering_lab.traffic import demo_messages

    kinds = [p["type"] for p in demo_messages(5)]   # publish payloads

Nothing here touches a clock, a socket or a bus: :mod:`gathering_lab.demo` puts
these payloads on a bus or sends them to a server, at a rate.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .events import EventType

__all__ = ["Payload", "demo_messages"]

_AGENT_NAMES = (
    "Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Gus", "Hana",
    "Ivo", "Jade", "Kofi", "Lena", "Mateo", "Nadia", "Oren", "Priya",
)  # fmt: skip
_MODELS = ("claude-sonnet", "gpt-4o", "mistral-large", "llama-3-70b")
_SKILLS = ("python", "react", "sql", "devops", "testing", "security", "docs", "api-design")
_CIRCLES = (
    ("backend-core", 1, "gathering-api"),
    ("dashboard-guild", 2, "dashboard"),
    ("data-pipeline", 3, "ingest"),
    ("release-crew", 1, "gathering-api"),
)
_TASKS: dict[str, tuple[tuple[str, str], ...]] = {
    "python": (
        ("Add retry with backoff to the webhook sender", "src/webhooks.py"),
        ("Split the event bus handlers by domain", "src/events.py"),
        ("Cache agent profiles between turns", "src/agents/profile.py"),
    ),
    "react": (
        ("Build the live events panel", "ui/EventsPanel.tsx"),
        ("Show reconnect state in the header", "ui/Header.tsx"),
    ),
    "sql": (
        ("Index tasks by circle and status", "db/migrations/0042_tasks.sql"),
        ("Speed up the weekly activity report", "db/reports.sql"),
    ),
    "devops": (
        ("Pin the base image and rebuild", "deploy/Dockerfile"),
        ("Add a readiness probe to the API", "deploy/api.yaml"),
    ),
    "testing": (
        ("Cover circle membership edge cases", "tests/test_circles.py"),
        ("Make the WebSocket tests deterministic", "tests/test_websocket.py"),
    ),
    "security": (
        ("Check origins on the dashboard socket", "src/websocket.py"),
        ("Rotate the JWT signing key", "src/auth.py"),
    ),
    "docs": (
        ("Translate the WebSocket quick start", "docs/WEBSOCKET.md"),
        ("Document the event types", "docs/EVENT_BUS.md"),
    ),
    "api-design": (
        ("Version the tasks endpoint", "src/api/routes.py"),
        ("Paginate the memories endpoint", "src/api/routes.py"),
    ),
}
_TOOLS: dict[str, tuple[str, ...]] = {
    "python": ("read_file", "write_file", "run_tests", "code_search"),
    "react": ("read_file", "write_file", "npm_build", "screenshot"),
    "sql": ("sql_query", "explain_plan", "write_file"),
    "devops": ("shell", "read_file", "docker_build"),
    "testing": ("run_tests", "read_file", "coverage"),
    "security": ("code_search", "dependency_audit", "read_file"),
    "docs": ("read_file", "write_file", "web_search"),
    "api-design": ("read_file", "code_search", "write_file"),
}
_ERRORS = (
    "tests failed: 3 of 112",
    "timed out after 300s",
    "merge conflict in {file}",
    "tool run_tests exited with status 2",
    "rate limited by the model provider",
)
_LINES = (
    "I can take this one, it touches code I wrote yesterday.",
    "Tests pass locally; can someone review {file}?",
    "Careful: {file} is also changed by another task.",
    "Blocked on the schema migration, picking up something else.",
    "Done with the draft, pushing a branch now.",
    "Does anyone remember why we pinned this dependency?",
    "The flaky test was a race in the fixture, fixed.",
)
_FACTS = (
    "{file} needs the integration tests to run against Postgres",
    "the CI runner has only 2 cores: keep test suites under 5 minutes",
    "reviews from {name} usually ask for type hints",
    "the staging deploy takes about 7 minutes",
    "use the shared retry helper instead of ad-hoc sleeps",
)
_WARNINGS = (
    ("scheduler", "task queue depth 1{n} exceeds the limit of 10"),
    ("llm", "provider latency p95 is {n}.2s"),
    ("memory", "vector index {n}0% full"),
    ("websocket", "{n} dashboard clients reconnected in the last minute"),
)


@dataclass(slots=True)
class _Agent:
    id: int
    name: str
    skills: tuple[str, ...]
    model: str
    circle: int | None = None
    task: int | None = None


@dataclass(slots=True)
class _Circle:
    id: int
    name: str
    project: int
    project_name: str
    conversation: int
    members: list[int] = field(default_factory=list)
    active: bool = True
    turn: int = 0
    messages: int = 0
    last_speaker: int | None = None
    completed: int = 0
    failed: int = 0


@dataclass(slots=True)
class _Task:
    id: int
    title: str
    file: str
    skill: str
    circle: int
    agent: int | None = None
    started: float = 0.0


Payload = dict[str, Any]
_Action = Callable[[], list[Payload]]


class _Story:
    """A discrete-event simulation: a clock, scheduled actions, and the world they change.

    Actions run in simulated-time order (ties in scheduling order) and return the
    events they cause; ``rng`` is the only source of chance, so a seed fixes the story.
    """

    MAX_CIRCLES = 3
    MAX_AGENTS = 14
    MAX_OPEN_TASKS = 6  # per circle

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = 0.0
        self.queue: list[tuple[float, int, _Action]] = []
        self.order = itertools.count()
        self.agents: dict[int, _Agent] = {}
        self.circles: dict[int, _Circle] = {}
        self.tasks: dict[int, _Task] = {}
        self.running: dict[int, _Task] = {}
        self.memories: list[tuple[int, int]] = []  # (memory id, agent id), most recent last
        self.agent_ids = itertools.count(1)
        self.circle_ids = itertools.count(1)
        self.task_ids = itertools.count(1)
        self.memory_ids = itertools.count(1)
        self.conversation_ids = itertools.count(1)
        self.names = list(_AGENT_NAMES)
        self.rng.shuffle(self.names)
        self.circle_specs = itertools.cycle(_CIRCLES)
        for delay in (0.0, 40.0, 150.0):
            self.at(delay, self.open_circle)
        self.at(60.0, self.system_warning)

    def at(self, delay: float, action: _Action) -> None:
        heapq.heappush(self.queue, (self.clock + delay, next(self.order), action))

    def __iter__(self) -> Iterator[Payload]:
        while self.queue:
            self.clock, _, action = heapq.heappop(self.queue)
            yield from action()

    @staticmethod
    def emit(
        event_type: EventType,
        circle: _Circle | None = None,
        agent: int | None = None,
        /,
        **data: Any,
    ) -> Payload:
        return {
            "type": event_type.value,
            "data": data,
            "source_agent_id": agent,
            "circle_id": None if circle is None else circle.id,
            "project_id": None if circle is None else circle.project,
        }

    # Circles and agents

    def open_circle(self) -> list[Payload]:
        if len(self.circles) >= self.MAX_CIRCLES:
            return []
        taken = {c.name for c in self.circles.values()}
        name, project, project_name = next(s for s in self.circle_specs if s[0] not in taken)
        circle = _Circle(
            next(self.circle_ids), name, project, project_name, next(self.conversation_ids)
        )
        self.circles[circle.id] = circle
        self.at(self.rng.uniform(0.3, 1.0), lambda: self.start_circle(circle))
        for _ in range(self.rng.randint(3, 4)):
            self.at(self.rng.uniform(0.5, 2.0), lambda: self.start_agent(circle))
        return [
            self.emit(
                EventType.CIRCLE_CREATED,
                circle,
                circle_id=circle.id,
                name=name,
                project=project_name,
            )
        ]

    def start_circle(self, circle: _Circle) -> list[Payload]:
        self.at(self.rng.uniform(2.0, 4.0), lambda: self.create_task(circle))
        self.at(self.rng.uniform(6.0, 12.0), lambda: self.chat(circle))
        self.at(self.rng.uniform(60.0, 120.0), lambda: self.churn(circle))
        self.at(self.rng.uniform(300.0, 600.0), lambda: self.wind_down(circle))
        return [self.emit(EventType.CIRCLE_STARTED, circle, circle_id=circle.id, name=circle.name)]

    def wind_down(self, circle: _Circle) -> list[Payload]:
        """The circle takes no new work; it stops once its open tasks are done."""
        circle.active = False
        return self.stop_circle(circle)

    def stop_circle(self, circle: _Circle) -> list[Payload]:
        if any(task.circle == circle.id for task in self.tasks.values()):
            self.at(5.0, lambda: self.stop_circle(circle))
            return []
        events = []
        for agent_id in list(circle.members):
            events.extend(self.leave(circle, self.agents[agent_id], "circle stopped"))
        del self.circles[circle.id]
        self.at(self.rng.uniform(5.0, 15.0), self.open_circle)
        events.append(
            self.emit(
                EventType.CIRCLE_STOPPED,
                circle,
                circle_id=circle.id,
                name=circle.name,
                tasks_completed=circle.completed,
                tasks_failed=circle.failed,
            )
        )
        return events

    def start_agent(self, circle: _Circle) -> list[Payload]:
        if not circle.active or len(self.agents) >= self.MAX_AGENTS:
            return []
        agent_id = next(self.agent_ids)
        skills = tuple(self.rng.sample(_SKILLS, 2))
        agent = _Agent(agent_id, self.names[(agent_id - 1) % len(self.names)], skills, "")
        agent.model = self.rng.choice(_MODELS)
        self.agents[agent_id] = agent
        agent.circle = circle.id
        circle.members.append(agent_id)
        role = "lead" if len(circle.members) == 1 else "member"
        return [
            self.emit(
                EventType.AGENT_STARTED,
                None,
                agent_id,
                agent_id=agent_id,
                name=agent.name,
                competencies=list(skills),
                model=agent.model,
            ),
            self.emit(
                EventType.CIRCLE_MEMBER_ADDED,
                circle,
                agent_id,
                circle_id=circle.id,
                agent_id=agent_id,
                agent_name=agent.name,
                role=role,
            ),
        ]

    def leave(self, circle: _Circle, agent: _Agent, reason: str) -> list[Payload]:
        del self.agents[agent.id]
        circle.members.remove(agent.id)
        self.memories = [m for m in self.memories if m[1] != agent.id]
        return [
            self.emit(
                EventType.CIRCLE_MEMBER_REMOVED,
                circle,
                agent.id,
                circle_id=circle.id,
                agent_id=agent.id,
                reason=reason,
            ),
            self.emit(EventType.AGENT_STOPPED, None, agent.id, agent_id=agent.id, reason=reason),
        ]

    def churn(self, circle: _Circle) -> list[Payload]:
        """Now and then an idle member (not the lead) leaves and a fresh agent takes the seat."""
        if not circle.active:
            return []
        self.at(self.rng.uniform(90.0, 180.0), lambda: self.churn(circle))
        idle = [a for a in circle.members[1:] if self.agents[a].task is None]
        if len(circle.members) < 3 or not idle:
            return []
        self.at(self.rng.uniform(1.0, 3.0), lambda: self.start_agent(circle))
        return self.leave(circle, self.agents[self.rng.choice(idle)], "rotation")

    # Tasks

    def create_task(self, circle: _Circle) -> list[Payload]:
        if not circle.active:
            return []
        self.at(self.rng.expovariate(1 / 5.0) + 0.5, lambda: self.create_task(circle))
        open_tasks = sum(1 for t in self.tasks.values() if t.circle == circle.id)
        if not circle.members or open_tasks >= self.MAX_OPEN_TASKS:
            return []
        skill = self.rng.choice(sorted({s for a in circle.members for s in self.agents[a].skills}))
        title, file = self.rng.choice(_TASKS[skill])
        task = _Task(next(self.task_ids), title, file, skill, circle.id)
        self.tasks[task.id] = task
        self.at(self.rng.uniform(0.5, 3.0), lambda: self.assign(task))
        return [
            self.emit(
                EventType.TASK_CREATED,
                circle,
                circle.members[0],
                task_id=task.id,
                title=title,
                priority=self.rng.choices(("low", "normal", "high"), (2, 5, 2))[0],
                skill=skill,
            )
        ]

    def assign(self, task: _Task) -> list[Payload]:
        circle = self.circles[task.circle]
        idle = [self.agents[a] for a in circle.members if self.agents[a].task is None]
        if not idle:
            self.at(self.rng.uniform(2.0, 5.0), lambda: self.assign(task))
            return []
        agent = self.rng.choice([a for a in idle if task.skill in a.skills] or idle)
        agent.task = task.id
        task.agent = agent.id
        self.at(self.rng.uniform(0.2, 1.5), lambda: self.start_task(task))
        return [
            self.emit(
                EventType.TASK_ASSIGNED,
                circle,
                circle.members[0],
                task_id=task.id,
                agent_id=agent.id,
                agent_name=agent.name,
            ),
            self.emit(
                EventType.AGENT_TASK_ASSIGNED,
                circle,
                agent.id,
                task_id=task.id,
                agent_id=agent.id,
                title=task.title,
            ),
        ]

    def start_task(self, task: _Task) -> list[Payload]:
        circle, agent = self.circles[task.circle], task.agent
        task.started = self.clock
        events = [
            self.emit(
                EventType.TASK_STARTED,
                circle,
                agent,
                task_id=task.id,
                agent_id=agent,
                file=task.file,
            )
        ]
        clash = next(
            (
                other
                for other in self.running.values()
                if other.file == task.file and self.circles[other.circle].project == circle.project
            ),
            None,
        )
        if clash is not None:
            events.append(
                self.emit(
                    EventType.TASK_CONFLICT_DETECTED,
                    circle,
                    agent,
                    task_id=task.id,
                    conflicting_task_id=clash.id,
                    file=task.file,
                    agents=[agent, clash.agent],
                )
            )
        self.running[task.id] = task
        known = [m for m, owner in self.memories if owner in circle.members]
        if known and self.rng.random() < 0.3:
            events.append(
                self.emit(
                    EventType.MEMORY_RECALLED,
                    circle,
                    agent,
                    memory_id=self.rng.choice(known),
                    agent_id=agent,
                    task_id=task.id,
                )
            )
        offset = 0.0
        for _ in range(self.rng.randint(1, 4)):
            offset += self.rng.uniform(1.0, 8.0)
            self.at(offset, lambda: self.use_tool(task))
        self.at(offset + self.rng.uniform(1.0, 6.0), lambda: self.finish_task(task))
        return events

    def use_tool(self, task: _Task) -> list[Payload]:
        return [
            self.emit(
                EventType.AGENT_TOOL_EXECUTED,
                self.circles[task.circle],
                task.agent,
                agent_id=task.agent,
                task_id=task.id,
                tool=self.rng.choice(_TOOLS[task.skill]),
                success=self.rng.random() > 0.08,
                duration_ms=int(self.rng.lognormvariate(5.5, 0.8)),
            )
        ]

    def finish_task(self, task: _Task) -> list[Payload]:
        assert task.agent is not None
        circle, agent = self.circles[task.circle], self.agents[task.agent]
        del self.running[task.id], self.tasks[task.id]
        agent.task = None
        facts = {"task_id": task.id, "agent_id": agent.id}
        facts["duration_ms"] = int((self.clock - task.started) * 1000)
        if self.rng.random() < 0.82:
            circle.completed += 1
            if self.rng.random() < 0.5:
                self.at(self.rng.uniform(0.2, 1.0), lambda: self.remember(agent, task))
            return [
                self.emit(
                    EventType.TASK_COMPLETED,
                    circle,
                    agent.id,
                    **facts,
                    result=f"done: {task.title.lower()}",
                    files_changed=1 + task.id % 4,
                ),
                self.emit(EventType.AGENT_TASK_COMPLETED, circle, agent.id, **facts),
            ]
        circle.failed += 1
        error = self.rng.choice(_ERRORS).format(file=task.file)
        return [
            self.emit(
                EventType.TASK_FAILED,
                circle,
                agent.id,
                **facts,
                error=error,
                will_retry=self.rng.random() < 0.5,
            ),
            self.emit(EventType.AGENT_TASK_FAILED, circle, agent.id, **facts, error=error),
        ]

    # Memory, conversation, system

    def remember(self, agent: _Agent, task: _Task) -> list[Payload]:
        if agent.id not in self.agents:
            return []
        circle = self.circles[task.circle]
        memory_id = next(self.memory_ids)
        self.memories = [*self.memories[-19:], (memory_id, agent.id)]
        fact = self.rng.choice(_FACTS).format(file=task.file, name=agent.name)
        events = [
            self.emit(
                EventType.MEMORY_CREATED,
                circle,
                agent.id,
                memory_id=memory_id,
                agent_id=agent.id,
                kind="fact",
                content=fact,
            )
        ]
        if self.rng.random() < 0.6:
            events.append(
                self.emit(
                    EventType.MEMORY_SHARED,
                    circle,
                    agent.id,
                    memory_id=memory_id,
                    agent_id=agent.id,
                    shared_with=f"circle:{circle.name}",
                )
            )
        return events

    def chat(self, circle: _Circle) -> list[Payload]:
        """Members talk in turns of 2-5 messages; each turn ends with turn.complete."""
        if not circle.active:
            return []
        if not circle.members:
            self.at(5.0, lambda: self.chat(circle))
            return []
        if circle.messages == 0:
            circle.turn += 1
        circle.messages += 1
        ends_turn = circle.messages >= self.rng.randint(2, 5)
        pause = self.rng.uniform(8.0, 20.0) if ends_turn else self.rng.uniform(0.5, 3.0)
        self.at(pause, lambda: self.chat(circle))
        speakers = [a for a in circle.members if a != circle.last_speaker] or circle.members
        speaker = circle.last_speaker = self.rng.choice(speakers)
        files = [t.file for t in self.tasks.values() if t.circle == circle.id] or ["README.md"]
        events = [
            self.emit(
                EventType.CONVERSATION_MESSAGE,
                circle,
                speaker,
                conversation_id=circle.conversation,
                turn=circle.turn,
                agent_id=speaker,
                content=self.rng.choice(_LINES).format(file=self.rng.choice(files)),
            )
        ]
        if ends_turn:
            events.append(
                self.emit(
                    EventType.CONVERSATION_TURN_COMPLETE,
                    circle,
                    conversation_id=circle.conversation,
                    turn=circle.turn,
                    messages=circle.messages,
                )
            )
            circle.messages = 0
        return events

    def system_warning(self) -> list[Payload]:
        self.at(self.rng.uniform(60.0, 150.0), self.system_warning)
        component, text = self.rng.choice(_WARNINGS)
        message = text.format(n=self.rng.randint(2, 9))
        return [self.emit(EventType.SYSTEM_WARNING, component=component, message=message)]


def demo_messages(count: int | None = None, *, seed: int = 0) -> Iterator[Payload]:
    """Yield ``count`` (default: endless) publish payloads of a seeded GatheRing story.

    Each payload is the ``data`` of a protocol ``publish`` message: a dict with
    ``type``, ``data``, ``source_agent_id``, ``circle_id`` and ``project_id``,
    about 100-300 bytes as JSON. The same ``seed`` always yields the same story.
    """
    if count is not None and (not isinstance(count, int) or count < 0):
        raise ValueError(f"count must be a non-negative integer or None, not {count!r}")
    story = iter(_Story(seed))
    if count is None:
        return story
    return itertools.islice(story, count)
