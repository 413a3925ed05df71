"""A small built-in English corpus (robots, scenes, objects, colours) for the tiny tokenizer.

The text is fixed and the templated part uses a private, seeded `random.Random`, so the corpus
(and therefore the trained tokenizer) is identical on every machine and Python version >= 3.10.
"""

from __future__ import annotations

import random

PASSAGES = [
    "The robot stands in the middle of a bright kitchen. A red cup sits on the wooden table, "
    "next to a green apple and a blue plate. The window behind the table is open.",
    "A small mobile robot drives along the corridor. On the left there is a grey door, "
    "on the right a yellow fire extinguisher hangs on the white wall.",
    "In front of the robot there is a person holding a black backpack. The person is walking "
    "towards the camera and smiling.",
    "The warehouse is full of brown cardboard boxes stacked on metal shelves. A forklift is "
    "parked near the loading dock, and the floor is marked with yellow lines.",
    "The image shows a garden with tall trees, a wooden bench and a white dog sitting on the "
    "grass. The sky is clear and blue.",
    "There is a laptop, a notebook and two pens on the desk. The screen of the laptop is dark. "
    "A lamp gives a warm orange light.",
    "The street is wet after the rain. Cars are waiting at the traffic light, which is red. "
    "A cyclist in a bright jacket crosses the road.",
    "The robot arm picks up a small orange cube and places it inside the transparent box. "
    "Three more cubes, purple, pink and white, are waiting on the conveyor belt.",
    "A cat sleeps on the sofa in the living room. The television is off, and a plant with "
    "large green leaves stands in the corner.",
    "The door in front of the robot is closed. The path to the left is clear, but a chair "
    "blocks the path to the right.",
    "I can see a parking lot with several cars. One car is silver, one is black and one is "
    "dark blue. There are no people in the image.",
    "The table is empty except for a glass of water and a folded newspaper. The room looks "
    "clean and quiet.",
    "What is in front of the robot? Describe the scene. What colour is the box? How many "
    "people are there? Is the path clear? Where is the cup?",
    "Frame one shows the robot near the door. Frame two shows the robot in the hallway. "
    "Frame three shows the robot next to the charging station.",
    "Sure, here is a short description of the image. The picture shows an office with desks, "
    "chairs, computers and a large window with a view of the city.",
    "A drone flies above the field. Below it, a tractor moves slowly between long rows of "
    "young plants. The soil is dark brown.",
    "The shelf holds books, a clock, a small robot toy and a photo of a family. The clock "
    "shows ten past nine.",
    "Two children are playing with a ball in the park. The ball is red and white. A woman is "
    "reading on a bench under a tree.",
    "The mobile manipulator navigates through the laboratory, scanning barcodes on containers. "
    "Its lidar sensor rotates continuously while the battery indicator shows sixty percent.",
    "Obstacles detected: a trolley, a ladder and a stack of tyres. The planner computes an "
    "alternative trajectory around the construction area.",
    "Outside, the weather is cloudy and windy. Leaves are blowing across the pavement, and an "
    "umbrella lies upside down beside the fountain.",
    "The assistant answers politely: the kettle is boiling, the refrigerator is closed, and the "
    "microwave displays twelve minutes.",
    "Visitors gather around the exhibition stand, where a humanoid robot waves its hand and "
    "greets everyone with a friendly voice.",
    "Inspection report: the pipe has visible corrosion, a valve is leaking, and the pressure "
    "gauge reads higher than expected.",
    "The delivery robot waits at the elevator. When the elevator doors open, it enters, "
    "selects the fourth floor and continues to the reception desk.",
    "Beneath the bridge flows a narrow river. Ducks swim near the reeds, and a fisherman "
    "stands quietly on the muddy bank.",
    "Each frame is analysed separately: the first contains a bicycle, the second a motorcycle, "
    "the third an empty sidewalk with scattered leaves.",
    "Warning: battery low. Please return to the docking station. Navigation paused because "
    "an unknown object appeared suddenly.",
    "The supermarket aisle has bananas, tomatoes, cucumbers, strawberries, bread, cheese, milk "
    "and several bottles of juice on the shelves.",
    "A bookshelf, a guitar, a piano and a colourful carpet decorate the apartment. Sunlight "
    "enters through curtains that are half open.",
    "At the airport, passengers pull suitcases towards the gate, while a cleaning machine "
    "polishes the shiny floor near the escalator.",
    "Thermal camera output suggests a warm motor, a cold window and a human silhouette "
    "standing behind the glass partition.",
]

COLOURS = [
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "grey",
    "brown", "silver", "gold", "dark", "light", "bright",
]
OBJECTS = [
    "cup", "box", "chair", "table", "door", "window", "ball", "bottle", "book", "lamp", "car",
    "bicycle", "person", "dog", "cat", "plant", "tree", "bag", "shoe", "phone", "laptop", "robot",
    "shelf", "sofa", "bed", "sign", "wall", "floor", "road", "cone", "pallet", "cable", "wheel",
    "screen", "camera", "sensor", "gripper", "tool", "hammer", "key", "helmet", "jacket",
    "glove", "bucket", "ladder", "trolley", "basket", "toy", "mug", "spoon", "fork", "knife",
    "mirror", "clock", "pillow", "blanket", "printer", "keyboard", "monitor", "drawer", "fence",
    "gate", "truck", "bus", "motorcycle", "scooter", "drone", "container", "barrel", "brick",
]
PLACES = [
    "kitchen", "office", "warehouse", "corridor", "garden", "street", "room", "hallway", "lab",
    "factory", "parking lot", "park", "garage", "station", "shop", "field", "bathroom",
    "bedroom", "library", "hospital", "school", "classroom", "airport", "supermarket",
    "restaurant", "basement", "balcony", "courtyard", "tunnel", "bridge", "harbour", "farm",
]
RELATIONS = [
    "next to", "in front of", "behind", "on top of", "under", "near", "to the left of",
    "to the right of", "inside", "beside", "between the wall and",
]
VERBS = [
    "sees", "moves towards", "picks up", "avoids", "follows", "detects", "looks at", "passes",
    "stops near", "turns away from", "carries", "pushes", "grabs", "inspects", "approaches",
    "ignores", "photographs", "measures", "cleans", "lifts", "drops", "rotates", "recognises",
]
TEMPLATES = [
    "There is a {c1} {o1} {r} the {c2} {o2}.",
    "The robot {v} the {c1} {o1} in the {p}.",
    "In the {p} I can see a {c1} {o1} and a {c2} {o2}.",
    "A {c1} {o1} is {r} the {o2}.",
    "The {o1} is {c1}, and the {o2} is {c2}.",
    "The image shows a {p} with a {c1} {o1}.",
    "How many {o1}s are in the {p}? There are two {c1} {o1}s.",
    "The {c1} {o1} {r} the robot is blocking the way.",
]


def corpus_lines(n_templated: int = 3000, seed: int = 1234) -> list[str]:
    """Return the corpus as a list of lines: the fixed passages, then templated sentences."""
    rng = random.Random(seed)
    lines = list(PASSAGES)
    for _ in range(n_templated):
        template = TEMPLATES[rng.randrange(len(TEMPLATES))]
        lines.append(template.format(
            c1=COLOURS[rng.randrange(len(COLOURS))],
            c2=COLOURS[rng.randrange(len(COLOURS))],
            o1=OBJECTS[rng.randrange(len(OBJECTS))],
            o2=OBJECTS[rng.randrange(len(OBJECTS))],
            p=PLACES[rng.randrange(len(PLACES))],
            r=RELATIONS[rng.randrange(len(RELATIONS))],
            v=VERBS[rng.randrange(len(VERBS))],
        ))
    return lines
