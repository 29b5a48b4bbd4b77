"""Write data/instructions.jsonl: the project's own small instruction set (MIT, like the code).

Every record comes from a template below over facts written here; nothing is copied from
another data set. Seeded, so the file is the same on every run:

    python tools/make_instructions.py            (writes data/instructions.jsonl)
"""

import json
import random
import sys
from pathlib import Path

rng = random.Random(2025)
records = []


def add(instruction, output, input=""):
    record = {"instruction": instruction}
    if input:
        record["input"] = input
    record["output"] = output
    if record not in records:           # a random draw may repeat an earlier one
        records.append(record)


# ---- arithmetic ---------------------------------------------------------------------------
for _ in range(16):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
for _ in range(12):
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    add(f"Subtract {b} from {a}.", f"{a} minus {b} is {a - b}.")
for _ in range(12):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    add(f"Multiply {a} by {b}.", f"{a} times {b} is {a * b}.")
for _ in range(10):
    b, q = rng.randint(2, 9), rng.randint(2, 12)
    add(f"What is {b * q} divided by {b}?", f"{b * q} divided by {b} is {q}.")
for _ in range(10):
    nums = [rng.randint(1, 30) for _ in range(rng.randint(3, 5))]
    add("Add up these numbers.", f"The sum is {sum(nums)}.", ", ".join(map(str, nums)))
for _ in range(10):
    n = rng.randint(3, 99)
    add(f"Is {n} an even or an odd number?", f"{n} is {'even' if n % 2 == 0 else 'odd'}.")
for _ in range(8):
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    add("Which number in this list is the largest?", f"The largest is {max(nums)}.",
        ", ".join(map(str, nums)))
for _ in range(8):
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    add("Sort these numbers from smallest to largest.", ", ".join(map(str, sorted(nums))),
        ", ".join(map(str, nums)))

# ---- words ----------------------------------------------------------------------------------
WORDS = ("garden window river pencil orange planet silver basket candle forest mirror "
         "rocket thunder pillow ladder marble saddle lantern violin meadow harbor button "
         "castle jacket kettle puzzle turtle wallet anchor bridge").split()
for word in rng.sample(WORDS, 12):
    add(f"Spell the word '{word}' backwards.", word[::-1])
for word in rng.sample(WORDS, 12):
    add(f"How many letters are in the word '{word}'?",
        f"The word '{word}' has {len(word)} letters.")
for word in rng.sample(WORDS, 8):
    add(f"What is the first letter of '{word}'?", f"The first letter is '{word[0]}'.")
for _ in range(10):
    chosen = rng.sample(WORDS, rng.randint(3, 5))
    add("Sort these words alphabetically.", ", ".join(sorted(chosen)), ", ".join(chosen))
SENTENCES = [
    "the cat sat on the warm mat", "we walked to the river after lunch",
    "a small boat drifted past the harbor", "she painted the fence bright blue",
    "the train leaves at seven every morning", "my brother plays the violin",
    "rain fell softly on the roof", "they planted tomatoes in the garden",
    "the lantern glowed in the dark room", "he forgot his wallet at home",
    "birds sang in the tall trees", "the old bridge crosses a quiet stream",
]
for sentence in SENTENCES[:8]:
    add("Write this text in capital letters.", sentence.upper(), sentence)
for sentence in SENTENCES:
    add("How many words are in this sentence?",
        f"The sentence has {len(sentence.split())} words.", sentence)
for sentence in SENTENCES[4:]:
    add("Capitalize the first letter of this sentence and end it with a full stop.",
        sentence[0].upper() + sentence[1:] + ".", sentence)

# ---- units -----------------------------------------------------------------------------------
for _ in range(8):
    km = rng.randint(2, 40)
    add(f"How many metres are in {km} kilometres?", f"{km} kilometres are {km * 1000} metres.")
for _ in range(8):
    h = rng.randint(2, 12)
    add(f"Convert {h} hours to minutes.", f"{h} hours are {h * 60} minutes.")
for _ in range(6):
    m = rng.randint(2, 15)
    add(f"How many seconds are in {m} minutes?", f"{m} minutes are {m * 60} seconds.")
for _ in range(6):
    kg = rng.randint(2, 25)
    add(f"Convert {kg} kilograms to grams.", f"{kg} kilograms are {kg * 1000} grams.")
for c in rng.sample(range(-20, 101, 5), 8):
    add(f"What is {c} degrees Celsius in Fahrenheit?",
        f"{c} degrees Celsius is {c * 9 // 5 + 32} degrees Fahrenheit.")
for _ in range(6):
    d = rng.randint(2, 10)
    add(f"How many hours are in {d} days?", f"{d} days have {d * 24} hours.")
for _ in range(6):
    cm = rng.randint(2, 9) * 100
    add(f"Convert {cm} centimetres to metres.", f"{cm} centimetres are {cm // 100} metres.")

# ---- Python ----------------------------------------------------------------------------------
PYTHON = [
    ("Which keyword defines a function in Python?", "The keyword def defines a function."),
    ("Which keyword defines a class in Python?", "The keyword class defines a class."),
    ("How do you write a comment in Python?",
     "Start it with #: everything after it on the line is ignored."),
    ("What does len() return?", "The number of items in a sequence or collection."),
    ("How do you get the last item of a list called items?", "Use items[-1]."),
    ("What does the range(5) object produce when you loop over it?",
     "The numbers 0, 1, 2, 3 and 4."),
    ("Which Python type maps keys to values?", "A dictionary (dict)."),
    ("How do you check whether a key is in a dictionary d?", "Write key in d."),
    ("What is the difference between a list and a tuple?",
     "A list can be changed after it is made; a tuple cannot."),
    ("How do you read a whole text file in Python?",
     "Open it with open(path) in a with block and call read() on the file."),
    ("What does the break statement do?", "It leaves the innermost loop at once."),
    ("What does the continue statement do?",
     "It skips the rest of the loop body and starts the next pass of the loop."),
    ("What value does a function return when it has no return statement?", "None."),
    ("How do you join a list of strings words with spaces?", "Use ' '.join(words)."),
    ("How do you split a string s into words?", "Call s.split()."),
    ("Which operator gives the remainder of a division?", "The % operator: 7 % 3 is 1."),
    ("Which operator divides and rounds down to a whole number?",
     "The // operator: 7 // 2 is 3."),
    ("How do you raise 2 to the power of 10 in Python?", "Write 2 ** 10, which is 1024."),
    ("What is a list comprehension?",
     "A short way to build a list from a loop, such as [x * x for x in range(5)]."),
    ("How do you handle an error in Python?",
     "Put the code in a try block and the handling in an except block."),
    ("What does the with statement do for a file?",
     "It closes the file when the block ends, even after an error."),
    ("How do you import the math module?", "Write import math."),
    ("What does the pass statement do?",
     "Nothing: it fills a place where Python needs a statement."),
    ("How do you turn the string '42' into a number?", "Call int('42')."),
    ("How do you turn the number 42 into a string?", "Call str(42)."),
    ("What is the result of 'abc' * 2 in Python?", "'abcabc'."),
    ("Which built-in function sorts a list and returns a new one?", "sorted()."),
    ("How do you add an item to the end of a list?", "Call the list's append() method."),
    ("What does the is operator compare?",
     "Whether two names refer to the very same object, not just equal values."),
    ("What is a virtual environment?",
     "A folder with its own Python packages, kept apart from the rest of the system."),
    ("Which command installs a package with pip?", "pip install followed by its name."),
    ("What does the lambda keyword make?", "A small anonymous function of one expression."),
    ("What does print() do?", "It writes its arguments as text to the standard output."),
    ("How do you get help on a Python keyword such as for?",
     "Run help('for') in the interpreter."),
    ("What is the boolean value of an empty list?", "False."),
    ("What does enumerate() give you in a loop?", "Each item together with its position."),
    ("What does zip() do?", "It pairs up the items of several sequences, position by position."),
    ("What is an f-string?",
     "A string with an f in front whose {expressions} are filled in, like f'{x} apples'."),
    ("How do you define a default value for a function argument?",
     "Write it after the name in the definition: def greet(name='world')."),
    ("What does the global keyword do inside a function?",
     "It makes assignments to that name change the module-level variable."),
]
for question, answer in PYTHON:
    add(question, answer)

# ---- rewriting ------------------------------------------------------------------------------
ANIMALS = "cat dog horse bird rabbit fox goat duck".split()
VERBS = "sleep run jump eat rest play swim hide".split()
for animal, verb in zip(ANIMALS, rng.sample(VERBS, len(VERBS))):
    add("Rewrite this sentence in the plural.", f"The {animal}s {verb}.", f"The {animal} {verb}s.")
LIKES = ["I like tea.", "We play chess on Sundays.", "They live near the sea.",
         "You need a ticket.", "I know the answer.", "We want more time."]
NEGATIVE = ["I do not like tea.", "We do not play chess on Sundays.",
            "They do not live near the sea.", "You do not need a ticket.",
            "I do not know the answer.", "We do not want more time."]
for positive, negative in zip(LIKES, NEGATIVE):
    add("Make this sentence negative.", negative, positive)
PAST = [("I walk to school.", "I walked to school."),
        ("She opens the door.", "She opened the door."),
        ("We cook dinner.", "We cooked dinner."),
        ("They watch the game.", "They watched the game."),
        ("He paints the wall.", "He painted the wall."),
        ("You clean the room.", "You cleaned the room.")]
for present, past in PAST:
    add("Put this sentence in the past tense.", past, present)
FORMAL = [("thanks a lot", "Thank you very much."), ("gimme a sec", "Please give me a moment."),
          ("can't make it today, sorry", "I am sorry, but I cannot attend today."),
          ("see ya tomorrow", "I will see you tomorrow."),
          ("got your note, will reply soon", "I received your message and will reply soon.")]
for casual, formal in FORMAL:
    add("Rewrite this in a formal tone.", formal, casual)

# ---- everyday facts -------------------------------------------------------------------------
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
for i, day in enumerate(DAYS):
    add(f"What day comes after {day}?", f"{DAYS[(i + 1) % 7]} comes after {day}.")
MONTHS = ("January February March April May June July August September October November "
          "December").split()
for i in rng.sample(range(12), 8):
    add(f"Which month comes after {MONTHS[i]}?", f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}.")
OPPOSITES = [("hot", "cold"), ("tall", "short"), ("early", "late"), ("open", "closed"),
             ("full", "empty"), ("light", "dark"), ("fast", "slow"), ("happy", "sad"),
             ("above", "below"), ("begin", "end")]
for word, opposite in OPPOSITES:
    add(f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{opposite}'.")
KINDS = [("apple", "a fruit"), ("carrot", "a vegetable"), ("salmon", "a fish"),
         ("sparrow", "a bird"), ("oak", "a tree"), ("violin", "a musical instrument"),
         ("hammer", "a tool"), ("banana", "a fruit"), ("potato", "a vegetable"),
         ("eagle", "a bird")]
for thing, kind in KINDS:
    add(f"What kind of thing is a {thing}?", f"A {thing} is {kind}.")
COLOURS = [("grass", "green"), ("the clear daytime sky", "blue"), ("snow", "white"),
           ("a ripe lemon", "yellow"), ("coal", "black"), ("a ripe tomato", "red")]
for thing, colour in COLOURS:
    add(f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.")

rng.shuffle(records)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "data/instructions.jsonl")
out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
               encoding="utf-8")
print(f"{out}: {len(records)} records")
