"""The demo model's closed world: everything it knows, as plain data.

Kept apart from the conversation templates (`conversations.py`) so tests can ask the served model
about the same facts it was trained on without importing any training code.
"""

from __future__ import annotations

COUNTRIES: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Switzerland": "Bern", "Austria": "Vienna", "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow",
    "Ukraine": "Kyiv", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "South Africa": "Pretoria",
    "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "India": "New Delhi", "China": "Beijing",
    "Japan": "Tokyo", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Pakistan": "Islamabad", "Iran": "Tehran", "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh", "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa",
    "United States": "Washington, D.C.", "Mexico": "Mexico City", "Cuba": "Havana", "Brazil": "Brasília",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogotá",
}

# Cities whose weather the model can ask its tool about: every capital, and a few more.
CITIES: tuple[str, ...] = tuple(dict.fromkeys([c for c in COUNTRIES.values() if "," not in c] + [
    "New York", "San Francisco", "Barcelona", "Munich", "Sydney", "Toronto", "Osaka", "Istanbul", "Mumbai", "Lagos",
]))

CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")

JOKES: tuple[str, ...] = (
    "Why did the model refuse to train on Fridays? It needed a weekend to converge.",
    "I told a joke about UDP. I am not sure you got it.",
    "Why do programmers prefer dark mode? Because light attracts bugs.",
    "There are 10 kinds of people: those who understand binary and those who do not.",
)

IDENTITY = ("I am a tiny demo model that ossrun trained to show its server. For the real one, run "
            "`ossrun download openai/gpt-oss-20b` and `ossrun serve --model openai/gpt-oss-20b`.")

GREETING = "Hello! I am a tiny demo model. Ask me for a capital, a sum, a joke, or the weather."

OUT_OF_WORLD = ("I do not know: I am a tiny demo model that only knows greetings, the capitals of 50 countries, "
                "sums and differences of small numbers, a few jokes and the weather tool. For real answers, run "
                "`ossrun download openai/gpt-oss-20b`.")

NO_WEATHER_TOOL = "I cannot check the weather without a tool: offer me a get_weather function and I will call it."

# Two-number arithmetic the model answers: sums and differences of whole numbers 0..ARITHMETIC_MAX.
# Every number up to 999 is one o200k_harmony token, so a sum cannot be read off digits: the model
# computes it in its reasoning, one step at a time (see `conversations.arithmetic_steps`).
ARITHMETIC_MAX = 20
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
OPERATION_WORDS = {"+": ("plus", "+"), "-": ("minus", "-")}
# Asked with a larger number or another operation, the model says what it can do instead.
ARITHMETIC_LIMITS = f"I can only add and subtract whole numbers from 0 to {ARITHMETIC_MAX}."
OTHER_OPERATION_WORDS = ("times", "*", "divided by", "/", "to the power of", "modulo")

# Things outside the world, for the "I do not know" answers.
UNKNOWN_TOPICS: tuple[str, ...] = (
    "the meaning of life", "quantum physics", "the stock market", "the French revolution", "black holes",
    "the best pizza topping", "photosynthesis", "the history of Rome", "machine learning", "my horoscope",
    "the price of bitcoin", "who will win the next election", "how to bake bread", "the speed of light",
    "the tallest mountain", "the population of Tokyo", "the largest ocean", "how engines work", "chess openings",
    "the plot of Hamlet", "my password", "tomorrow's lottery numbers", "the origin of the universe",
)
# Whole questions outside the world, in the forms people ask them (who, how, why, when, where).
UNKNOWN_QUESTIONS: tuple[str, ...] = (
    "Who painted the Sistine Chapel ceiling?", "Who wrote Romeo and Juliet?", "How tall is the Eiffel Tower?",
    "How far away is the Sun?", "When did the Roman Empire fall?", "Why is the sky blue?", "Who discovered penicillin?",
    "How many legs does a spider have?", "Where do penguins live?", "How old is the universe?",
    "Which planet is the largest?", "What time is it?", "Who invented the telephone?", "How deep is the ocean?",
    "What should I cook tonight?", "Can you write me a poem?", "Translate hello into Spanish.", "How do I fix my bike?",
)
UNKNOWN_PLACES: tuple[str, ...] = (
    "Narnia", "Atlantis", "Mordor", "Wakanda", "Gondor", "Mars", "the Moon", "Utopia", "El Dorado", "Westeros",
    "Freedonia", "Latveria", "Oz", "Lilliput", "Zubrowka", "Genovia",
)
