"""What a person or a cron job runs: the ``yalm-forecast`` command line, its output, the demo."""
