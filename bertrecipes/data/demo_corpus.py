"""A synthetic, English-like demo corpus for smoke-testing BERT pre-training on a CPU.

Every word list and sentence template here is written for this project; no outside text is used.
Each document is a short story about one protagonist in one *topic* (a farm, a ship, a bakery, ...).
The design gives both pre-training objectives something to learn in a few CPU minutes:

* masked LM: sentences follow a small grammar with agreement (a/an, singular/plural verbs, was/were,
  number words, he/she/his/her matching the protagonist), the topic fixes the nouns and verbs, and the
  protagonist, companion and a "key object" recur across sentences;
* next-sentence prediction: consecutive sentences share topic, characters and key object, and time
  markers ("In the morning" ... "After dinner") only move forward, so a sentence from another document
  is usually detectable.

Usage::

    from bertrecipes.data.demo_corpus import generate_demo_corpus
    docs = generate_demo_corpus(num_documents=2000, seed=0)   # list[list[str]]
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["generate_demo_corpus", "TOPIC_NAMES"]


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _third_person(verb: str) -> str:
    # Verbs and nouns inflect by the same spelling rules for the words used here (washes, carries).
    return _plural(verb)


def _article(word: str) -> str:
    # Word lists avoid words where spelling and sound disagree ("hour", "unicorn").
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class _Noun:
    singular: str
    plural: str


@dataclass(frozen=True)
class _Verb:
    base: str
    third: str
    past: str


def _nouns(spec: str) -> tuple[_Noun, ...]:
    """Parse "goat sheep:sheep goose:geese": regular plurals unless given after a colon."""
    out = []
    for item in spec.split():
        singular, _, plural = item.partition(":")
        out.append(_Noun(singular, plural or _plural(singular)))
    return tuple(out)


def _verbs(spec: str) -> tuple[_Verb, ...]:
    """Parse "feed:fed wash:washed": base form and past tense; third person is derived."""
    out = []
    for item in spec.split():
        base, _, past = item.partition(":")
        if not past:
            raise ValueError(f"verb {item!r} needs a past tense after a colon, e.g. 'feed:fed'")
        out.append(_Verb(base, _third_person(base), past))
    return tuple(out)


@dataclass(frozen=True)
class _Topic:
    name: str
    roles: tuple[_Noun, ...]
    things: tuple[_Noun, ...]
    places: tuple[str, ...]
    verbs: tuple[_Verb, ...]
    adjectives: tuple[str, ...]


def _topic(name: str, roles: str, things: str, places: str, verbs: str, adjectives: str) -> _Topic:
    return _Topic(name, _nouns(roles), _nouns(things), tuple(places.split()), _verbs(verbs),
                  tuple(adjectives.split()))


_TOPICS: tuple[_Topic, ...] = (
    _topic("farm",
           "farmer shepherd farmhand beekeeper",
           "goat cow sheep:sheep hen pig horse goose:geese lamb duck calf:calves",
           "barn field meadow orchard stable pond",
           "feed:fed brush:brushed count:counted wash:washed chase:chased herd:herded watch:watched",
           "muddy hungry noisy brown lazy gentle fat sleepy"),
    _topic("sea",
           "sailor captain fisherman:fishermen navigator",
           "net rope sail anchor lantern map barrel compass oar boat",
           "harbour deck island lighthouse beach cabin",
           "mend:mended tie:tied raise:raised lower:lowered pull:pulled coil:coiled clean:cleaned",
           "salty wet heavy torn blue sturdy"),
    _topic("space",
           "astronaut engineer pilot scientist",
           "rocket satellite helmet panel robot antenna capsule sensor telescope battery",
           "station orbit module airlock hangar observatory",
           "repair:repaired launch:launched test:tested charge:charged scan:scanned dock:docked "
           "calibrate:calibrated",
           "silver distant electric shiny frozen metal"),
    _topic("bakery",
           "baker cook waiter apprentice",
           "loaf:loaves cake pie cookie bun tart oven tray pan muffin",
           "bakery kitchen pantry shop counter cellar",
           "bake:baked slice:sliced decorate:decorated glaze:glazed knead:kneaded taste:tasted "
           "wrap:wrapped",
           "sweet warm golden crispy fresh sticky"),
    _topic("forest",
           "ranger woodcutter hunter explorer",
           "fox deer:deer owl squirrel mushroom berry acorn log bear wolf:wolves",
           "forest woods clearing cave valley creek",
           "follow:followed gather:gathered track:tracked spot:spotted carry:carried pick:picked "
           "photograph:photographed",
           "green dark wild tall shy hidden mossy"),
    _topic("market",
           "merchant trader shopkeeper porter",
           "basket carpet coin spice jar scale cart lamp vase ribbon",
           "market square street stall alley fountain",
           "sell:sold buy:bought weigh:weighed polish:polished stack:stacked price:priced "
           "display:displayed",
           "colourful cheap costly rare dusty fancy"),
    _topic("school",
           "teacher pupil tutor librarian",
           "book pencil chalk desk notebook ruler globe lesson poem puzzle",
           "classroom library school hall playground office",
           "read:read write:wrote copy:copied study:studied solve:solved learn:learned mark:marked",
           "clever new difficult long simple neat"),
    _topic("castle",
           "knight guard squire herald",
           "sword shield banner crown spear gate trumpet drum scroll flag",
           "castle courtyard tower dungeon moat gatehouse",
           "guard:guarded sharpen:sharpened defend:defended inspect:inspected hoist:hoisted "
           "wave:waved lift:lifted",
           "royal brave iron proud ancient loyal"),
    _topic("hospital",
           "doctor nurse patient surgeon",
           "bandage pill syringe chart bed blanket thermometer stretcher bottle needle",
           "hospital ward clinic pharmacy corridor lab",
           "examine:examined treat:treated check:checked measure:measured prepare:prepared "
           "sterilise:sterilised change:changed",
           "clean sick healthy calm sterile white"),
    _topic("music",
           "singer drummer violinist conductor",
           "violin piano:pianos flute guitar song melody harp cello:cellos note concert",
           "theatre studio stage auditorium",
           "play:played tune:tuned practise:practised compose:composed rehearse:rehearsed "
           "record:recorded perform:performed",
           "loud beautiful sad cheerful slow lively"),
    _topic("mountain",
           "climber guide mountaineer skier",
           "tent backpack boot glove pickaxe stove sled kettle map:maps torch",
           "mountain summit glacier ridge camp slope",
           "climb:climbed pack:packed pitch:pitched melt:melted drag:dragged fasten:fastened "
           "unpack:unpacked",
           "icy steep cold windy snowy high"),
    _topic("garden",
           "gardener florist groundskeeper botanist",
           "rose tulip seed shovel hose vine daisy pot hedge sunflower",
           "garden greenhouse shed lawn path nursery",
           "water:watered plant:planted trim:trimmed dig:dug prune:pruned arrange:arranged "
           "fertilise:fertilised",
           "pink yellow thorny tidy fragrant blooming"),
)

TOPIC_NAMES: tuple[str, ...] = tuple(t.name for t in _TOPICS)

_FEMALE_NAMES = ("Anna Clara Emma Grace Hannah Iris Julia Lena Maya Nora Olive Rosa Sara Tessa Vera "
                 "Zoe").split()
_MALE_NAMES = ("Adam Ben Carl David Eric Felix Hugo Jack Leo Max Noah Oscar Paul Sam Tom Victor").split()

_NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve").split()

# Ordered so a document's time markers only move forward: a sentence borrowed from another story
# tends to break that order, which is one of the cues for next-sentence prediction.
_TIME_MARKERS = ("early in the morning", "in the morning", "later that morning", "at noon", "after lunch",
                 "in the afternoon", "late in the afternoon", "in the evening", "at sunset", "after dinner")


@dataclass
class _Person:
    name: str
    female: bool

    @property
    def subj(self) -> str:
        return "she" if self.female else "he"

    @property
    def obj(self) -> str:
        return "her" if self.female else "him"

    @property
    def poss(self) -> str:
        return "her" if self.female else "his"


class _Story:
    """The fixed cast and props of one document, plus helpers that draw topic words with agreement."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.topic = rng.choice(_TOPICS)
        self.hero = self._person()
        self.friend = self._person()
        while self.friend.name == self.hero.name:
            self.friend = self._person()
        self.role = rng.choice(self.topic.roles)
        self.key = rng.choice(self.topic.things).singular
        self.home = rng.choice(self.topic.places)

    def _person(self) -> _Person:
        female = self.rng.random() < 0.5
        return _Person(self.rng.choice(_FEMALE_NAMES if female else _MALE_NAMES), female)

    def adj(self) -> str:
        return self.rng.choice(self.topic.adjectives)

    def place(self) -> str:
        return self.rng.choice(self.topic.places)

    def verb(self) -> _Verb:
        return self.rng.choice(self.topic.verbs)

    def thing(self) -> _Noun:
        return self.rng.choice(self.topic.things)

    def counted(self) -> str:
        """A number word and a noun that agrees with it: "one goat", "seven geese"."""
        n = self.rng.randrange(len(_NUMBER_WORDS))
        noun = self.thing()
        return f"{_NUMBER_WORDS[n]} {noun.singular if n == 0 else noun.plural}"


def _intro(s: _Story) -> str:
    h, role, adj = s.hero, s.role.singular, s.adj()
    return s.rng.choice((
        f"{h.name} was {_article(adj)} {adj} {role} who worked in the {s.home}.",
        f"There once was {_article(role)} {role} named {h.name} who lived near the {s.home}.",
        f"{h.name} worked as {_article(role)} {role} in the {s.home} with {s.friend.name}.",
    ))


def _possession(s: _Story) -> str:
    h, adj = s.hero, s.adj()
    if s.rng.random() < 0.5:
        return f"{h.subj} had {_article(adj)} {adj} {s.key} and {s.counted()}."
    return f"every day {h.subj} {s.verb().third} the {s.thing().plural} and looks after {h.poss} {s.key}."


# Event bodies are lower-case at the start unless they open with a name; a time marker may be put in
# front, and the sentence is capitalised afterwards. `timed` says whether a marker reads naturally.
_Event = Callable[[_Story], str]


def _ev_did_things(s: _Story) -> str:
    return f"{s.hero.name} {s.verb().past} the {s.adj()} {s.thing().plural} in the {s.place()}."


def _ev_did_key(s: _Story) -> str:
    return f"{s.hero.subj} {s.verb().past} {s.hero.poss} {s.key} with {s.friend.name}."


def _ev_busy(s: _Story) -> str:
    return f"the {s.role.plural} were busy, so {s.hero.name} {s.verb().past} the {s.thing().plural} alone."


def _ev_friend_said(s: _Story) -> str:
    if s.rng.random() < 0.5:
        noun, be = f"{s.hero.poss} {s.key}", "was"
    else:
        noun, be = f"the {s.thing().plural}", "were"
    return f"{s.friend.name} said that {noun} {be} too {s.adj()}."


def _ev_lost_key(s: _Story) -> str:
    h = s.hero
    return f"{h.subj} could not find {h.poss} {s.key}, so {h.subj} looked in the {s.place()}."


def _ev_together(s: _Story) -> str:
    return f"{s.hero.name} and {s.friend.name} {s.verb().past} {s.counted()} near the {s.place()}."


def _ev_habit(s: _Story) -> str:
    v, things = s.verb(), s.thing().plural
    return (f"most {s.role.plural} {v.base} their {things} every day, but {s.hero.name} {v.third} "
            f"{s.hero.poss} {things} only once a week.")


def _ev_asked(s: _Story) -> str:
    return f"{s.friend.name} asked {s.hero.name} to {s.verb().base} the {s.key}, and {s.hero.subj} agreed."


def _ev_found(s: _Story) -> str:
    adj, thing = s.adj(), s.thing().singular
    return f"{s.hero.subj} found {_article(adj)} {adj} {thing} behind the {s.place()}."


def _ev_state(s: _Story) -> str:
    return f"{s.hero.poss} {s.key} was {s.adj()}, and the {s.thing().plural} were {s.adj()}."


def _ev_told(s: _Story) -> str:
    return f"{s.hero.name} told {s.friend.name} that {s.hero.poss} {s.key} was missing."


def _ev_helped(s: _Story) -> str:
    return f"{s.friend.name} helped {s.hero.obj} {s.verb().base} the {s.thing().plural}."


_EVENTS: tuple[tuple[_Event, bool], ...] = (
    (_ev_did_things, True), (_ev_did_key, True), (_ev_busy, True), (_ev_friend_said, False),
    (_ev_lost_key, True), (_ev_together, True), (_ev_habit, False), (_ev_asked, True),
    (_ev_found, True), (_ev_state, False), (_ev_told, True), (_ev_helped, True),
)


def _ending(s: _Story) -> str:
    h = s.hero
    return s.rng.choice((
        f"at the end of the day, {h.name} went home to the {s.home}, tired but happy.",
        f"that night {h.subj} dreamed about {s.adj()} {s.thing().plural} and {h.poss} {s.key}.",
        f"finally, {h.name} thanked {s.friend.name} and said goodbye.",
    ))


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _document(rng: random.Random) -> list[str]:
    s = _Story(rng)
    num_sentences = rng.randint(4, 12)
    num_events = num_sentences - 3
    events: list[tuple[_Event, bool]] = []
    while len(events) < num_events:
        candidate = rng.choice(_EVENTS)
        # Avoid the same template twice in a row: it would make NSP trivially easy on repeats.
        if not events or candidate is not events[-1]:
            events.append(candidate)
    timed = [i for i, (_, can_time) in enumerate(events) if can_time and rng.random() < 0.6]
    markers = dict(zip(timed, sorted(rng.sample(range(len(_TIME_MARKERS)), len(timed))), strict=True))

    sentences = [_intro(s), _possession(s)]
    for i, (event, _) in enumerate(events):
        body = event(s)
        if i in markers:
            body = f"{_TIME_MARKERS[markers[i]]}, {body}"
        sentences.append(body)
    sentences.append(_ending(s))
    return [_capitalise(x) for x in sentences]


def generate_demo_corpus(num_documents: int = 2000, seed: int = 0) -> list[list[str]]:
    """Return `num_documents` synthetic stories, each a list of 4-12 sentences.

    Deterministic: the same (num_documents, seed) gives the same corpus on every platform, because
    only `random.Random(seed)` is used. A longer corpus with the same seed starts with the shorter one.
    """
    if num_documents < 1:
        raise ValueError(f"num_documents must be >= 1, got {num_documents}")
    rng = random.Random(seed)
    return [_document(rng) for _ in range(num_documents)]
