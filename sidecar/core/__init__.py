"""The pure decision core: no asyncio, grpc, aiohttp or redis in here, and time is a value."""
