"""Thunderbird support of the station agent: profiles, prefs.js, the account switch (E30-E33)."""
