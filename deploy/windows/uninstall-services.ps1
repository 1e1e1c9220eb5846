# Stop and remove the tmrl relay and trainer Windows services (elevated PowerShell).
param([Parameter(Mandatory = $true)][string]$Venv, [string[]]$Services = @("relay", "trainer"))
$ErrorActionPreference = "Continue"
$python = Join-Path $Venv "Scripts\python.exe"
$script = Join-Path $PSScriptRoot "tmrl_windows_service.py"
foreach ($service in $Services) {
    & $python $script $service stop
    & $python $script $service remove
}
