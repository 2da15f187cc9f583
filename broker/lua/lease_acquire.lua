-- Grant a VRAM lease to a job on one GPU, atomically, or refuse. Never oversubscribes: the sum of live
-- leases (jobs and resident weights) stays <= capacity. Expired leases are dropped first, so a killed
-- worker's memory comes back by itself. A job already holding a live lease for another worker is refused
-- (fencing: one job id never runs twice at once). `job_start.lua` does the same and starts the job.
-- Lease value: "mib|expires_at|kind|priority|workload|worker|fence"
-- KEYS[1] leases hash of the GPU   KEYS[2] the job's fence counter
-- ARGV[1] now  ARGV[2] capacity MiB  ARGV[3] job id  ARGV[4] job MiB  ARGV[5] ttl s  ARGV[6] priority
-- ARGV[7] workload  ARGV[8] holder (the process)  ARGV[9] weights field ('' for none)  ARGV[10] weights MiB
-- Returns {1, fence, free MiB after} | {0, 0, free MiB now} | {-1, 0, 0} (held by another worker)
-- #include job_lib
local granted, fence, free = lease_take(KEYS[1], KEYS[2])
return {granted, fence, free}
