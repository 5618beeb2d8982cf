-- in_flight.lua: count the unexpired leases in one lease set (by the server's clock, which is
-- why this is a script and not a plain ZCOUNT). Writes nothing.
--
-- KEYS[1]  a lease set: qos:{tenant}:leases, qos:{tenant}:class_leases:<class> or
--          qos:{=<model>}:model_leases or qos:{=<model>@<pod>}:model_leases
--
-- Returns the count.

return count_leases(KEYS[1], now_s(), false)
