-- aigate.config.modules: where `require` looks for the user's modules while a config is in use.
--
-- The host (main.c) starts package.path as aigate's library files (when they are read from files),
-- then the user's entries ($AIGATE_LUA_PATH), then the system's Lua 5.4 directories and ./, and
-- package.cpath as the user's entries then the system's; it leaves those parts in
-- package.loaded["aigate.searchpath"]. `use` puts the user's entries of a config in their place: the
-- config file's directory first (so that a config finds the modules beside it, wherever aigate runs
-- from), then $AIGATE_LUA_PATH, then the config's `lua_path`. The part is replaced, not added to, so
-- that loading a config again (SIGHUP) leaves the path as the first load made it, and entries a
-- script put in front of the path itself stay. Without the host's parts (a plain Lua interpreter)
-- it does nothing.

local M = {}

local parts = package.loaded["aigate.searchpath"]

-- The user's part as last written, in package.path and package.cpath.
local written = parts and { path = parts.user, cpath = parts.cuser }
-- What `use` was last given, for `current`.
local in_use = {}

-- An absolute path without "." and ".." parts ("/a/b/../c" is "/a/c"), for readable messages.
local function tidy(path)
  local out = {}
  for part in path:gmatch("[^/]+") do
    if part == ".." then
      out[#out] = nil
    elseif part ~= "." then
      out[#out + 1] = part
    end
  end
  return "/" .. table.concat(out, "/")
end

-- The directory of the config file `path`, made absolute (the current directory is the one aigate
-- started in: it never changes it).
local function dir_of(path)
  local dir = path:match("^(.*)/[^/]*$") or "."
  if dir:sub(1, 1) ~= "/" then
    if not parts.cwd then
      return dir
    end
    dir = parts.cwd .. "/" .. dir
  end
  return tidy(dir)
end

-- Each entry of a ';'-separated list once, in order; as a string with ';' after each entry.
local function unique(s)
  local seen, out = {}, {}
  for entry in s:gmatch("[^;]+") do
    if not seen[entry] then
      seen[entry] = true
      out[#out + 1] = entry .. ";"
    end
  end
  return table.concat(out)
end

-- Replaces the user's part in the path string `field` of package (before the system's part `tail`).
local function replace(field, tail, new)
  local current = package[field]
  local old = written[field] .. tail
  local at = current:find(old, 1, true)
  if at == nil then
    return -- the path was set by someone else (a script): it is theirs
  end
  package[field] = current:sub(1, at - 1) .. new .. tail .. current:sub(at + #old)
  written[field] = new
end

--- Makes the user's part of the search paths: `config_path`'s directory (nil: none), then
-- $AIGATE_LUA_PATH, then `lua_path` (nil: none; directories or templates separated by ';').
function M.use(config_path, lua_path)
  if parts == nil then
    return
  end
  local dir = config_path and dir_of(config_path)
  local path, cpath = "", ""
  if dir then
    local sep = dir:sub(-1) == "/" and "" or "/"
    path = dir .. sep .. "?.lua;" .. dir .. sep .. "?/init.lua;"
  end
  path, cpath = path .. parts.user, cpath .. parts.cuser
  if lua_path then
    local p, c = parts.expand(lua_path)
    path, cpath = path .. p, cpath .. c
  end
  replace("path", parts.system, unique(path))
  replace("cpath", parts.csystem, unique(cpath))
  in_use = { config_path = config_path, lua_path = lua_path }
end

--- The arguments `use` was last given: config_path, lua_path (to go back to them).
function M.current()
  return in_use.config_path, in_use.lua_path
end

return M
