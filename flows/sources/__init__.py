"""Where the news comes from: feed definitions, fetching over HTTP, and ingesting into the store."""
