"""The transport seam (memory and AMQP), the topology, and the local RabbitMQ node."""
