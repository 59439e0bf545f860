"""station_agent."""
