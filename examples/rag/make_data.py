"""The retrieval example's world: an encyclopedia of invented people, companies, cities and countries whose facts
chain, and 2- and 3-hop questions over it with gold answers. Seeded: the same seed gives the same corpus and questions.

    python examples/rag/make_data.py                 # the question files (train, held-out, reworded held-out)
    python examples/rag/build_index.py               # the corpus (100,000+ documents) and its BM25 index

Every entity has one document. A person is born in a city and works for a company; a company was founded by a
person and has its headquarters in a city; a city lies in a country. A question names one entity and asks for
the end of a chain of 2 or 3 of those facts, so the agent has to find the first document, read the next name in
it, and search again. Names are made of invented syllables, so nothing is known from pre-training, and a
search has to carry the full name: a first name alone matches thousands of people.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7
DOCS = 100_000  # people + companies + cities + countries

FIRST = ["Ada", "Bram", "Cora", "Dane", "Elin", "Finn", "Gwen", "Hugo", "Ines", "Joel", "Kira", "Lars", "Mira",
         "Nils", "Orla", "Pim", "Quin", "Rhea", "Sven", "Tove", "Uma", "Vera", "Wim", "Yara", "Zane", "Alba",
         "Boris", "Clea", "Dario", "Edda", "Filip", "Greta", "Hanne", "Ivo", "Jana", "Kai", "Lene", "Milo",
         "Nora", "Otto", "Pia", "Rune", "Sanne", "Teo", "Ulla", "Vito", "Wanda", "Xeni", "Yannick", "Zora"]
ONSET = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
         "v", "w", "z", "sk", "th"]
VOWEL = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
CODA = ["", "n", "r", "l", "s", "th", "k", "m", "nd", "rt", "x"]
COMPANY_KIND = ["Labs", "Works", "Group", "Systems", "Holdings", "Foundry", "Trading", "Partners", "Mills", "Dynamics"]
INDUSTRY = ["shipping", "software", "textile", "mining", "publishing", "brewing", "robotics", "insurance",
            "farming", "aviation", "glassmaking", "fishing"]
PROFESSION = ["engineer", "painter", "chemist", "lawyer", "baker", "pilot", "teacher", "architect", "sailor",
              "composer", "surgeon", "carpenter"]
RIVER_SIZE = ["small", "large", "coastal", "mountain", "river", "harbour"]


def _syllables(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ONSET) + rng.choice(VOWEL) + rng.choice(CODA) for _ in range(n)).capitalize()


def _unique(rng: random.Random, count: int, make, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = make()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


@dataclass
class World:
    countries: list[dict]
    cities: list[dict]
    companies: list[dict]
    people: list[dict]

    def documents(self):
        """(doc_id, title, text) of every entity, countries first."""
        for c in self.countries:
            yield c["id"], c["name"], f"{c['name']} is a country whose capital is {c['capital']}. Its currency is the {c['currency']}."
        for c in self.cities:
            yield c["id"], c["name"], (f"{c['name']} is a {c['size']} city in {c['country']}. It was founded in "
                                       f"{c['year']} and lies on the {c['river']} river.")
        for c in self.companies:
            yield c["id"], c["name"], (f"{c['name']} is a {c['industry']} company founded by {c['founder']} in "
                                       f"{c['year']}. Its headquarters are in {c['city']}.")
        for p in self.people:
            yield p["id"], p["name"], (f"{p['name']} is a {p['profession']} born in {p['city']} in {p['year']}. "
                                       f"{p['pronoun']} works for {p['employer']}.")


def make_world(seed: int = SEED, docs: int = DOCS) -> World:
    """The entities and their facts: about 2% countries, 13% cities, 25% companies, 60% people."""
    rng = random.Random(seed)
    n_countries = max(4, docs // 50)
    n_cities = max(8, docs * 13 // 100)
    n_companies = max(8, docs // 4)
    n_people = docs - n_countries - n_cities - n_companies
    taken: set[str] = set()
    country_names = _unique(rng, n_countries, lambda: _syllables(rng, 2) + rng.choice(["ia", "land", "stan", "mark", ""]), taken)
    city_names = _unique(rng, n_cities, lambda: _syllables(rng, 2) + rng.choice(["port", "burg", "vik", "dal", "ton", ""]), taken)
    company_names = _unique(rng, n_companies, lambda: f"{_syllables(rng, rng.choice([1, 2]))} {rng.choice(COMPANY_KIND)}", taken)
    surnames = _unique(rng, n_people, lambda: _syllables(rng, rng.choice([2, 3])), taken)
    countries = [{"id": f"country-{i}", "name": name, "currency": _syllables(rng, 1).lower(), "capital": None}
                 for i, name in enumerate(country_names)]
    cities = [{"id": f"city-{i}", "name": name, "country": countries[i % n_countries]["name"] if i < n_countries
               else rng.choice(countries)["name"], "size": rng.choice(RIVER_SIZE), "year": rng.randint(900, 1900),
               "river": _syllables(rng, 1)} for i, name in enumerate(city_names)]
    for i, country in enumerate(countries):
        country["capital"] = cities[i]["name"]  # the first cities are the capitals (each in its own country)
    people = [{"id": f"person-{i}", "name": f"{rng.choice(FIRST)} {surname}", "profession": rng.choice(PROFESSION),
               "city": rng.choice(cities)["name"], "year": rng.randint(1920, 2000), "pronoun": rng.choice(["He", "She"]),
               "employer": None} for i, surname in enumerate(surnames)]
    companies = [{"id": f"company-{i}", "name": name, "industry": rng.choice(INDUSTRY), "founder": rng.choice(people)["name"],
                  "year": rng.randint(1850, 2020), "city": rng.choice(cities)["name"]} for i, name in enumerate(company_names)]
    for person in people:
        person["employer"] = rng.choice(companies)["name"]
    return World(countries, cities, companies, people)


# (kind, hops, template, reworded template); the chain from the named entity to the answer is in make_questions.
# One-hop questions: half of train.jsonl, and the difficulty the 135M model learns (train_1hop.jsonl,
# test_1hop.jsonl); test.jsonl and test_reworded.jsonl are 2 and 3 hops.
ONE_HOP = [
    ("birthplace", 1, "Where was {person} born?", "{person} was born in which city?"),
    ("company_founder", 1, "Who founded {company}?", "{company} was founded by which person?"),
    ("company_city", 1, "In which city are the headquarters of {company}?", "{company} has its headquarters in which city?"),
]
QUESTIONS = [
    ("founder_birthplace", 2, "Where was the founder of {company} born?",
     "The person who founded {company} was born in which city?"),
    ("company_country", 2, "In which country are the headquarters of {company}?",
     "{company} has its headquarters in a city. Which country is that city in?"),
    ("employer_founder", 2, "Who founded the company that {person} works for?",
     "{person} works for a company. Who is its founder?"),
    ("founder_country", 3, "In which country was the founder of {company} born?",
     "The founder of {company} was born in a city. Which country is it in?"),
    ("employer_country", 3, "In which country is the company that {person} works for based?",
     "{person} works for a company. In which country are its headquarters?"),
]


def make_questions(world: World, rng: random.Random, n: int, used: set[str], kinds: list | None = None) -> list[dict]:
    """``n`` questions whose named entities are not in ``used`` (added to it), the ``kinds`` (default: the 2- and
    3-hop ``QUESTIONS``) in turn."""
    kinds = kinds or QUESTIONS
    people = {p["name"]: p for p in world.people}
    cities = {c["name"]: c for c in world.cities}
    companies = {c["name"]: c for c in world.companies}
    out = []
    while len(out) < n:
        kind, hops, template, reworded = kinds[len(out) % len(kinds)]
        if kind == "birthplace":
            start = rng.choice(world.people)
            names, chain, answer = {"person": start["name"]}, [start["name"]], start["city"]
        elif kind in ("company_founder", "company_city"):
            start = rng.choice(world.companies)
            names, chain = {"company": start["name"]}, [start["name"]]
            answer = start["founder"] if kind == "company_founder" else start["city"]
        elif kind.startswith("employer"):
            start = rng.choice(world.people)
            company = companies[start["employer"]]
            names = {"person": start["name"]}
            chain = [start["name"], company["name"]]
            if kind == "employer_founder":
                answer = company["founder"]
            else:
                chain.append(company["city"])
                answer = cities[company["city"]]["country"]
        else:
            start = rng.choice(world.companies)
            names = {"company": start["name"]}
            chain = [start["name"]]
            if kind == "company_country":
                chain.append(start["city"])
                answer = cities[start["city"]]["country"]
            else:
                founder = people[start["founder"]]
                chain += [founder["name"]]
                answer = founder["city"]
                if kind == "founder_country":
                    chain.append(founder["city"])
                    answer = cities[founder["city"]]["country"]
        if start["name"] in used:
            continue
        used.add(start["name"])
        out.append({"id": f"{kind}-{start['id']}", "kind": kind, "hops": hops, "question": template.format(**names),
                    "reworded": reworded.format(**names), "answer": answer, "chain": chain})
    return out


def reworded(questions: list[dict]) -> list[dict]:
    """The same questions asked in their other words (same answers and chains)."""
    return [{**q, "question": q["reworded"]} for q in questions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--docs", type=int, default=DOCS)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--one-hop-share", type=float, default=0.5, help="share of one-hop questions in train")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    world = make_world(args.seed, args.docs)
    rng, used = random.Random(args.seed + 1), set()
    one_hop = round(args.train * args.one_hop_share)
    train = make_questions(world, rng, args.train - one_hop, used) + make_questions(world, rng, one_hop, used, ONE_HOP)
    random.Random(args.seed + 2).shuffle(train)
    test = make_questions(world, rng, args.test, used)
    test_1hop = make_questions(world, rng, args.test, used, ONE_HOP)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in [("train.jsonl", train), ("test.jsonl", test),
                       ("test_reworded.jsonl", reworded(test)),
                       ("test_1hop.jsonl", test_1hop),
                       # the one-hop difficulty on its own (README, attempt 4): train on these, evaluate on test_1hop
                       ("train_1hop.jsonl", [q for q in train if q["hops"] == 1]),
                       # the 2- and 3-hop half (multihop_*.yaml: SFT from traces, then GRPO; evaluated on test)
                       ("train_multihop.jsonl", [q for q in train if q["hops"] > 1]),
                       ("test_1hop_reworded.jsonl", reworded(test_1hop))]:
        with open(args.out / name, "w") as fh:
            for row in rows:
                fh.write(json.dumps({k: v for k, v in row.items() if k != "reworded"}) + "\n")
    print(f"{len(train)} train ({one_hop} of one hop, also in train_1hop.jsonl, the rest in train_multihop.jsonl), "
          f"{len(test)} held-out questions (and "
          f"reworded), {len(test_1hop)} one-hop held-out (and reworded) in {args.out}")


if __name__ == "__main__":
    main()
