"""Write data/sms_demo.tsv: the project's own small spam / ham set (MIT, like the code), or
fetch the real SMS Spam Collection.

    python tools/make_classify_data.py               (writes data/sms_demo.tsv; offline)
    python tools/make_classify_data.py --sms-spam    (data/sms_spam.tsv from UCI, CC BY 4.0)

The demo set: text messages in the manner of the SMS Spam Collection, every one made here from
a template below over words written for it (nothing is copied from the collection or any other
data set), seeded, so the file is the same on every run. Half are ham, half spam; a few of
each are made to be hard: ham that talks of prizes, free evenings and calls, spam that asks
for nothing but a click. A TSV with a header (label, text), as classify.read_labelled reads.
"""

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_PER_CLASS = 300
NAMES = "Sam Alex Priya Tom Jo Mia Ben Lucy Omar Kate Dan Ella Raj Nina Max Zoe".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
TIMES = ("6", "7", "8", "half 7", "half 8", "9")
PLACES = ("the station", "the shop", "the office", "the cafe", "the gym", "the library",
          "the bus stop", "your mum's", "the park")
FOODS = "milk bread eggs coffee rice tomatoes cheese apples".split()
PLANS = ("dinner", "a film", "the pub", "a walk", "football", "the market", "coffee")
NUMBERS = ("08712 460 324", "09061 701 461", "0800 195 6669", "87121", "80082", "69669",
           "85023", "09050 003 091")
AMOUNTS = ("£100", "£250", "£500", "£1000", "£2000", "$500", "$1,000", "£150")
GIFTS = ("cash prize", "gift voucher", "holiday for 2", "new phone", "shopping card",
         "camera", "laptop")
SITES = ("secure-account-check.com", "my-refund-now.net", "verify-your-id.info",
         "claim-bonus.co", "parcel-redelivery.org")

HAM = [
    lambda r: f"Are you {r.choice(['free', 'around', 'busy'])} on {r.choice(DAYS)}? "
              f"Thinking of {r.choice(PLANS)}.",
    lambda r: f"Running {r.choice(['5', '10', '15', '20'])} minutes late, sorry! "
              f"{r.choice(['See you soon', 'Start without me', 'Order for me'])}.",
    lambda r: f"Can you pick up {r.choice(FOODS)} and {r.choice(FOODS)} on the way home?",
    lambda r: f"Happy birthday {r.choice(NAMES)}! Hope you have a lovely day x",
    lambda r: f"Did you {r.choice(['see', 'watch'])} the {r.choice(['match', 'game', 'news'])} "
              f"last night? {r.choice(['Unbelievable', 'So good', 'What a mess'])}.",
    lambda r: f"{r.choice(['Call', 'Ring'])} me when you get this, nothing urgent.",
    lambda r: f"Thanks for {r.choice(['lunch', 'the lift', 'your help', 'dinner'])} today "
              f"{r.choice(NAMES)}, really needed that.",
    lambda r: f"I'm at {r.choice(PLACES)}, where are you?",
    lambda r: f"Meeting moved to {r.choice(['3pm', '4pm', '10am', 'tomorrow'])}, "
              f"{r.choice(['same room', 'room 2', 'on the second floor'])}.",
    lambda r: f"Don't forget {r.choice(['mum', 'dad', 'gran'])}'s "
              f"{r.choice(['birthday', 'dinner', 'visit'])} on {r.choice(DAYS)}.",
    lambda r: f"Got the tickets! {r.choice(['Two', 'Three', 'Four'])} seats for "
              f"{r.choice(DAYS)} at {r.choice(TIMES)}.",
    lambda r: f"Can I call you later? In a meeting until {r.choice(['5', '6', '4'])}.",
    lambda r: f"ok {r.choice(['see u there', 'sounds good', 'no worries', 'cool'])} "
              f"{r.choice(['', ':)', 'x', 'lol'])}".strip(),
    lambda r: f"Lol that's {r.choice(['hilarious', 'so funny', 'brilliant'])}. Tell "
              f"{r.choice(NAMES)} I said hi.",
    lambda r: f"What time does {r.choice(PLANS)} start? I'll meet you at {r.choice(PLACES)}.",
    lambda r: f"Just landed, home by {r.choice(TIMES)}. Is there any food left?",
    lambda r: f"{r.choice(NAMES)} says the keys are under the mat. Back on {r.choice(DAYS)}.",
    lambda r: "Sorry I missed your call, was driving. Everything ok?",
    # hard ham: words that spam uses, in ordinary messages
    lambda r: f"We won the pub quiz! The prize is a round of drinks, come by {r.choice(PLACES)}.",
    lambda r: f"I'm free after {r.choice(['5', '6', '7'])}, call me and we'll sort out "
              f"{r.choice(['the rent', 'the trip', 'the car'])}.",
    lambda r: "Text me the number of the plumber please, the kitchen tap is leaking again.",
    lambda r: f"Claire got the job!! Drinks on {r.choice(DAYS)} to celebrate, reply if you "
              f"can make it.",
]
SPAM = [
    lambda r: f"URGENT! You have won a {r.choice(AMOUNTS)} {r.choice(GIFTS)}. Call "
              f"{r.choice(NUMBERS)} now to claim. Valid {r.choice(['12', '24', '48'])}hrs only.",
    lambda r: f"Congratulations! You have been selected for a FREE {r.choice(GIFTS)}. Text "
              f"{r.choice(['WIN', 'YES', 'CLAIM'])} to {r.choice(NUMBERS)}.",
    lambda r: f"FREE entry in our weekly {r.choice(['draw', 'competition', 'prize draw'])}! "
              f"Txt {r.choice(['WIN', 'PLAY', 'GO'])} to {r.choice(NUMBERS)}. T&Cs apply 18+",
    lambda r: f"Your mobile number has won {r.choice(AMOUNTS)}! To claim call "
              f"{r.choice(NUMBERS)} from a landline. Claim code {r.randint(100, 999)}.",
    lambda r: f"You are a WINNER! Reply {r.choice(['YES', 'CLAIM', 'PRIZE'])} to get your "
              f"{r.choice(['reward', 'prize', 'bonus'])} now. Std rates apply.",
    lambda r: f"Last chance: {r.choice(['50%', '70%', '80%'])} off "
              f"{r.choice(['ringtones', 'loans', 'insurance', 'top-ups'])}. Reply STOP to opt out.",
    lambda r: f"Hot singles in your area want to chat! Text {r.choice(['CHAT', 'DATE'])} to "
              f"{r.choice(NUMBERS)}. {r.choice(['£1.50', '£3', '£2'])}/msg 18+ only.",
    lambda r: f"Claim your {r.choice(['bonus', 'refund', 'cashback'])} of {r.choice(AMOUNTS)} "
              f"today. Offer ends {r.choice(['tonight', 'at midnight', 'soon'])}, call "
              f"{r.choice(NUMBERS)}.",
    lambda r: f"Ur awarded a {r.choice(GIFTS)} or {r.choice(AMOUNTS)} cash! Call "
              f"{r.choice(NUMBERS)} to collect. Box {r.randint(100, 999)} PO.",
    lambda r: f"Get {r.choice(['unlimited', 'free', '1000'])} texts for just "
              f"{r.choice(['£1', '£2', '£5'])} a week! Txt {r.choice(['GO', 'TXT'])} to "
              f"{r.choice(NUMBERS)} now.",
    # hard spam: nothing to win, only a link to click
    lambda r: f"Dear customer, your account "
              f"{r.choice(['needs verification', 'is on hold', 'is suspended'])}. "
              f"Visit {r.choice(SITES)} today.",
    lambda r: f"Your parcel could not be delivered. Book a new slot at {r.choice(SITES)}",
    lambda r: f"Hi {r.choice(NAMES)}, we tried to reach you about your "
              f"{r.choice(['car accident', 'tax refund', 'pension'])}. Reply now to talk.",
]


def make(n_per_class=N_PER_CLASS, seed=2025):
    """[(label, text), ...]: ``n_per_class`` distinct texts of each class, in a seeded order."""
    rng = random.Random(seed)
    rows = []
    for label, templates in (("ham", HAM), ("spam", SPAM)):
        texts = []
        while len(texts) < n_per_class:
            text = rng.choice(templates)(rng)
            if text not in texts:
                texts.append(text)
        rows += [(label, t) for t in texts]
    rng.shuffle(rows)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "data" / "sms_demo.tsv"))
    p.add_argument("--sms-spam", action="store_true",
                   help="fetch the SMS Spam Collection from UCI into data/sms_spam.tsv instead")
    p.add_argument("--url", default=None, help="with --sms-spam: a mirror of UCI's zip")
    args = p.parse_args(argv)
    if args.sms_spam:
        from engine.records import SMS_SPAM_URL, fetch_sms_spam
        path = fetch_sms_spam(ROOT / "data", args.url or SMS_SPAM_URL)
    else:
        from engine.records import write_labelled_tsv
        path = write_labelled_tsv(Path(args.out), make())
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
