"""Writes draft_prompts.jsonl: chat prompts for distilling a speculative-decoding draft.

A draft has to guess what the target says to ordinary requests, so it is distilled on the target's
own answers to many kinds of request (explanations, lists, stories, advice, how-tos, comparisons)
on everyday topics. Templates x topics, written for edgekit (no outside text). None of them is
among benchmarks/speculative.py's evaluation prompts (the topics there are left out on purpose).
    python recipes/data/make_draft_prompts.py
"""

import json
from pathlib import Path

TEMPLATES = [
    "Explain {t} in simple terms.",
    "Give me three interesting facts about {t}.",
    "Write a short paragraph about {t}.",
    "What are the advantages and disadvantages of {t}?",
    "How would you describe {t} to someone who has never heard of it?",
    "Write a four-line poem about {t}.",
    "What is the history of {t}, briefly?",
    "List a few common misconceptions about {t}.",
]
TOPICS = [
    "volcanoes", "the moon", "honeybees", "electric cars", "chess", "the Roman Empire", "coffee",
    "recycling", "the internet", "dinosaurs", "jazz music", "the human heart", "rainforests",
    "bicycles", "the printing press", "sleep", "earthquakes", "olive oil", "penguins", "solar panels",
    "the Olympic Games", "libraries", "glaciers", "vaccines", "the stock market", "origami",
    "public transport", "black holes", "bread baking", "the piano", "deserts", "friendship",
    "video games", "the French Revolution", "coral reefs", "meditation", "airplanes", "tea",
    "the periodic table", "gardening", "wolves", "democracy", "mountains", "museums", "robots",
    "the ocean tides", "running a marathon", "maps", "mushrooms", "the telephone",
]
TASKS = [
    "Write a short story about a robot who learns to paint.",
    "Write a thank-you note to a neighbour who watered my plants.",
    "Give me a packing list for a weekend camping trip.",
    "How do I change a flat tire on a bicycle?",
    "Suggest five names for a small bakery.",
    "Write a short dialogue between a cat and a dog about breakfast.",
    "What should I consider when adopting a pet?",
    "Plan a simple three-day itinerary for a trip to a city by the sea.",
    "How can I improve my handwriting?",
    "Write a limerick about a forgetful wizard.",
    "What is a healthy breakfast I can make in five minutes?",
    "Explain how a bill becomes a law, in general terms.",
    "Describe a sunset over the mountains.",
    "How do I start learning to play the guitar?",
    "Write a short product description for a reusable water bottle.",
    "What are good ways to save money on groceries?",
]


def main() -> None:
    prompts = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES] + TASKS
    out = Path(__file__).with_name("draft_prompts.jsonl")
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"{len(prompts)} prompts -> {out}")


if __name__ == "__main__":
    main()
