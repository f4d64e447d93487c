"""From stored news to prompts: versioned templates and rendering them for a night."""
