"""Procedural tabletop scenes: coloured objects, a gripper (open or closed) and a
green target zone, asked as Robo2VLM-style multiple choice (4-way yes/no, 5-way
otherwise, some answered by "None of the above") at the three levels of the
`robot` taxonomy. Multiple choice is answered with the option's text, not its
letter (`meta["answer_with"]`): the tiny model cannot learn to look a letter up
(docs/calibration.md); the scorer reads either.

The general kinds (`GENERAL_KINDS`: describe the scene, locate an object, say
whether an object is there, count them, name the object in a quadrant, pick the
option that says given words, and of the robot itself: the gripper's state and
place, what lies under it, where the target zone is, which way an arrow points;
and how two of object, gripper and target lie, along one axis at a time)
are off unless a weight switches them on: the generic visual question answering
a general VLM knows before it meets this benchmark. They look where its
questions look, but never ask one (no grasp, success or motion question among
them): a general model that never looked at the gripper gives SFT nothing to
read there (docs/calibration.md).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mose.data.schema import Sample
from mose.data.world.common import IMAGE_SIZE, arrow, multiple_choice, weighted

SHAPES = ("cube", "ball", "cup")
COLORS = {"red": "#d22", "green": "#2a2", "blue": "#26d", "yellow": "#dc2"}
YES_NO = ["Yes", "No", "Cannot be determined", "Not applicable"]
NONE = "None of the above"
MOVES = {"move left": (-1, 0), "move right": (1, 0), "move forward": (0, -1),
         "move backward": (0, 1)}
QUESTION_KINDS = ("gripper_open", "object_color", "closest", "task_success", "grasp_stable",
                  "graspable", "next_move", "place_move", "trajectory")
# Drawn after the benchmark's kinds: at weight 0 the draw over those is what it was without them.
GENERAL_KINDS = ("describe", "locate", "exists", "count", "which", "choose", "gripper_state",
                 "gripper_where", "under_gripper", "target_where", "arrow_way", "relative")
DEFAULT_WEIGHTS = dict.fromkeys(GENERAL_KINDS, 0.0)  # `generate` merges user weights over these
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
WAYS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # the arrow's, in the image
NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)  # every object the world can draw
# What the benchmark's options say (the `choose` kind picks one by its words, never for a scene).
PHRASES = (*YES_NO, *COLORS, *NAMES, *MOVES, "close the gripper",
           "lift the object", "release the object", "stay still", NONE)
# question kind → (task, {level: skill}) — the ground truth the rules must recover
SKILLS = {
    "gripper_open": ("perception", {"perception": "gripper"}),
    "object_color": ("perception", {"perception": "object"}),
    "closest": ("perception", {"perception": "spatial"}),
    "task_success": ("interpretation", {"perception": "spatial", "interpretation": "task_state"}),
    "grasp_stable": ("interpretation", {"perception": "gripper", "interpretation": "physics"}),
    "graspable": ("interpretation", {"perception": "spatial", "interpretation": "affordance"}),
    "next_move": ("planning", {"perception": "spatial", "interpretation": "affordance",
                               "planning": "grasp"}),
    "place_move": ("planning", {"perception": "spatial", "interpretation": "task_state",
                                "planning": "place"}),
    "trajectory": ("planning", {"perception": "gripper", "planning": "trajectory"}),
}


@dataclass
class Thing:
    shape: str
    color: str
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    things: list[Thing]
    gripper: tuple[int, int]
    gripper_open: bool
    target: tuple[int, int]  # centre of the 24 × 24 target zone
    arrow: tuple[int, int] | None = None

    def holding(self) -> Thing | None:
        """The object under a closed gripper."""
        return None if self.gripper_open else self.under_gripper()

    def under_gripper(self) -> Thing | None:
        gx, gy = self.gripper
        return next((t for t in self.things if abs(t.x - gx) <= 6 and abs(t.y - gy) <= 6), None)

    def in_target(self, thing: Thing) -> bool:
        return abs(thing.x - self.target[0]) <= 12 and abs(thing.y - self.target[1]) <= 12


def _grid(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Distinct cell centres on a 4 × 4 grid (28 px cells), so objects never overlap."""
    cells = rng.sample(range(16), count)
    return [(14 + 28 * (c % 4), 14 + 28 * (c // 4)) for c in cells]


def _scene(rng: random.Random) -> Scene:
    count = rng.randint(2, len(SHAPES))
    spots = _grid(rng, count + 1)
    # One object per shape, so "the cube" always names one object.
    things = [Thing(shape, rng.choice(list(COLORS)), x, y)
              for shape, (x, y) in zip(rng.sample(SHAPES, count), spots, strict=False)]
    # Half the scenes have an object already in the target zone, so "is it done?" and "release" occur.
    placed = rng.choice(things) if rng.random() < 0.5 else None
    target = (placed.x, placed.y) if placed else spots[-1]
    if rng.random() < 0.4:  # gripper right over an object
        holder = rng.choice(things)
        gripper = (holder.x, holder.y)
    else:
        gripper = _grid(rng, 1)[0]
    return Scene(things, gripper, rng.random() < 0.5, target)


def _direction(dx: int, dy: int) -> str:
    """The move (one axis, the larger) that brings the gripper closer."""
    if abs(dx) >= abs(dy):
        return "move right" if dx > 0 else "move left"
    return "move backward" if dy > 0 else "move forward"


def quadrant(x: int, y: int) -> str:
    return f"{'top' if y < IMAGE_SIZE / 2 else 'bottom'} {'left' if x < IMAGE_SIZE / 2 else 'right'}"


def describe(scene: Scene) -> str:
    """`a red cube at the top left, a blue ball at the bottom right; the target is at the top right.`"""
    things = sorted(scene.things, key=lambda t: (t.y, t.x))  # top to bottom, then left to right
    objects = ", ".join(f"a {t.name} at the {quadrant(t.x, t.y)}" for t in things)
    return f"{objects}; the target is at the {quadrant(*scene.target)}."


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "#d9c7a3")  # table
    draw = ImageDraw.Draw(image)
    tx, ty = scene.target
    draw.rectangle([tx - 12, ty - 12, tx + 12, ty + 12], outline="#0a0", width=2)
    for t in scene.things:
        box = [t.x - 6, t.y - 6, t.x + 6, t.y + 6]
        if t.shape == "ball":
            draw.ellipse(box, fill=COLORS[t.color])
        elif t.shape == "cup":
            draw.rectangle([t.x - 5, t.y - 6, t.x + 5, t.y + 6], fill=COLORS[t.color], outline="#333")
        else:
            draw.rectangle(box, fill=COLORS[t.color])
    gx, gy = scene.gripper
    spread = 9 if scene.gripper_open else 5
    draw.line([(gx - spread, gy - 10), (gx - spread, gy + 4)], fill="#444", width=3)  # fingers
    draw.line([(gx + spread, gy - 10), (gx + spread, gy + 4)], fill="#444", width=3)
    draw.line([(gx - spread, gy - 10), (gx + spread, gy - 10)], fill="#444", width=3)
    if scene.arrow:
        arrow(draw, gx, gy, *scene.arrow, color="#f0f", length=16)
    return image


def _ask(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str, list[str]]:
    """(question, correct answer, distractors) for one question kind."""
    thing = rng.choice(scene.things)
    if kind == "task_success":  # about as often done as not: ask of the placed object half the time
        placed = [t for t in scene.things if scene.in_target(t)]
        if placed and rng.random() < 0.5:
            thing = placed[0]
    names = [t.name for t in scene.things]
    others = list(NAMES)
    yes = {True: "Yes", False: "No"}
    if kind == "gripper_open":
        return "Is the robot's gripper open?", yes[scene.gripper_open], YES_NO
    if kind == "object_color":
        return f"What color is the {thing.shape}?", thing.color, list(COLORS)
    if kind == "closest":
        gx, gy = scene.gripper
        nearest = min(scene.things, key=lambda t: (t.x - gx) ** 2 + (t.y - gy) ** 2)
        return ("Which object is CLOSEST to the robot's end effector?", nearest.name, names + others)
    if kind == "task_success":
        return (f"Has the robot successfully completed the task of putting the {thing.name} "
                "in the green target?", yes[scene.in_target(thing)], YES_NO)
    if kind == "grasp_stable":
        held = scene.holding()
        subject = held or thing
        return f"Is the grasp of the {subject.name} stable?", yes[held is subject], YES_NO
    if kind == "graspable":
        under = scene.under_gripper()
        answer = under.name if under and scene.gripper_open else NONE
        return "Which object can the robot grasp without moving its arm?", answer, names + others
    if kind == "next_move":
        gx, gy = scene.gripper
        if (thing.x, thing.y) == scene.gripper:
            answer = "close the gripper" if scene.gripper_open else "lift the object"
        else:
            answer = _direction(thing.x - gx, thing.y - gy)
        distractors = [*MOVES, "close the gripper", "lift the object"]
        return f"To pick up the {thing.name}, what should the robot do next?", answer, distractors
    if kind == "place_move":
        held = scene.holding() or thing
        dx, dy = scene.target[0] - held.x, scene.target[1] - held.y
        answer = "release the object" if scene.in_target(held) else _direction(dx, dy)
        return (f"The robot must place the {held.name} in the green target. Which way should it "
                "move?", answer, [*MOVES, "release the object"])
    move = rng.choice(list(MOVES))
    scene.arrow = MOVES[move]
    return ("The magenta arrow shows the direction the robot will move next. Which is it?", move,
            [*MOVES, "stay still"])


def _five(rng: random.Random, answer: str, pool: list[str]) -> list[str]:
    """The answer and four others drawn from `pool`: a general question's five options, unshuffled."""
    return [answer, *rng.sample(sorted(set(pool) - {answer}), 4)]


def _general(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str, list[str] | None]:
    """(question, answer, the options to choose from, or None for an open answer) of a general kind."""
    if kind == "describe":
        return "Describe the scene.", describe(scene), None
    if kind == "locate":
        thing = rng.choice(scene.things)
        return f"Where is the {thing.name}?", quadrant(thing.x, thing.y), list(QUADRANTS)
    if kind == "exists":
        names = [t.name for t in scene.things]
        absent = [name for name in NAMES if name not in names]
        name = rng.choice(names if rng.random() < 0.5 else absent)
        return f"Is there a {name} on the table?", "Yes" if name in names else "No", YES_NO
    if kind == "which":  # a quadrant holding one object or none: 5-way, as the benchmark asks names
        alone = [q for q in QUADRANTS if sum(quadrant(t.x, t.y) == q for t in scene.things) <= 1]
        where = rng.choice(alone)
        there = [t.name for t in scene.things if quadrant(t.x, t.y) == where]
        answer = there[0] if there else NONE
        return f"Which object is at the {where} of the table?", answer, _five(rng, answer, [*NAMES, NONE])
    if kind == "choose":  # reading the options: the one that says the given words
        phrase = rng.choice(PHRASES)
        return f"Pick the option: {phrase}", phrase, _five(rng, phrase, list(PHRASES))
    if kind == "gripper_state":
        state = "open" if scene.gripper_open else "closed"
        return "Is the gripper open or closed?", state, ["open", "closed"]
    if kind == "gripper_where":
        return "Where is the gripper?", quadrant(*scene.gripper), list(QUADRANTS)
    if kind == "target_where":
        return "Where is the green target?", quadrant(*scene.target), list(QUADRANTS)
    if kind == "under_gripper":
        under = scene.under_gripper()
        answer = under.name if under else "nothing"
        return "What is under the gripper?", answer, _five(rng, answer, [*NAMES, "nothing"])
    if kind == "arrow_way":  # the arrow of the benchmark's trajectory question, named as a direction
        way = rng.choice(list(WAYS))
        scene.arrow = WAYS[way]
        return "Which way does the magenta arrow point?", way, list(WAYS)
    if kind == "relative":
        return _relative(rng, scene)
    return "How many objects are on the table?", str(len(scene.things)), ["1", "2", "3", "4"]


def _relative(rng: random.Random, scene: Scene) -> tuple[str, str, list[str]]:
    """How two of the scene's things lie along one axis: the relation a move reads, asked
    without the benchmark's computation (which axis is larger, which move, when to stop).
    Either order is asked, so no one thing's place predicts the answer, and every model tried
    stays at chance on it; asked in a fixed order it is learnt (docs/calibration.md, robot)."""
    places = [(f"the {t.name}", (t.x, t.y)) for t in scene.things]
    places += [("the gripper", scene.gripper), ("the green target", scene.target)]
    pairs = [(a, b) for a in places for b in places if a[1] != b[1]]  # one spot has no relation
    (a, (ax, ay)), (b, (bx, by)) = rng.choice(pairs)
    if ax != bx and (ay == by or rng.random() < 0.5):
        side = "left" if ax < bx else "right"
        return f"Is {a} to the left or to the right of {b}?", side, ["left", "right"]
    return f"Is {a} above or below {b}?", "above" if ay < by else "below", ["above", "below"]


def _benchmark(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str, list[str], int]:
    """(question, answer, choices, correct) of a benchmark kind, as Robo2VLM asks it."""
    question, answer, distractors = _ask(rng, scene, kind)
    yes_no = distractors is YES_NO
    size = 4 if yes_no else 5
    if not yes_no and answer != NONE and rng.random() < 0.2:
        # About a fifth of 5-way items: the right answer is left out.
        distractors = [d for d in distractors if d != answer]
        answer = NONE
    choices, correct = multiple_choice(rng, answer, [*distractors, NONE] if not yes_no else distractors,
                                       size)
    return question, answer, choices, correct


def make_sample(rng: random.Random, sample_id: str, image_path: str,
                weights: Mapping[str, float]) -> tuple[Sample, Image.Image]:
    scene = _scene(rng)
    kind = weighted(rng, QUESTION_KINDS + GENERAL_KINDS, weights)  # defaults merged in by `generate`
    if kind in GENERAL_KINDS:
        question, answer, options = _general(rng, scene, kind)
        choices, correct = multiple_choice(rng, answer, options, len(options)) if options else (None, None)
        task, skills = ("description" if kind == "describe" else "general_vqa"), {}
    else:
        question, answer, choices, correct = _benchmark(rng, scene, kind)
        task, skills = SKILLS[kind]
    full_skills = {"perception": "general", "interpretation": "general", "planning": "general", **skills}
    meta = {"domain": "robot", "question_kind": kind, "gripper_open": scene.gripper_open,
            "objects": [t.name for t in scene.things],
            "where": {t.name: quadrant(t.x, t.y) for t in scene.things},
            "gripper_where": quadrant(*scene.gripper), "target_where": quadrant(*scene.target),
            "under_gripper": getattr(scene.under_gripper(), "name", None),
            **({"answer_with": "text"} if choices else {})}
    sample = Sample(id=sample_id, images=[image_path], question=question, answer=answer, task=task,
                    choices=choices, correct=correct, skills=full_skills, meta=meta)
    return sample, render(scene)
