"""The pipeline's database: schema and migrations, the prompt queue, results, the robot's views."""
